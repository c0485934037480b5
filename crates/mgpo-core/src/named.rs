//! How a caller hands tensors to the optimizer: each with its name, in the
//! order of [`crate::Layout::names`], like PyTorch's `named_parameters()`.
//! Every call checks every name, so tensors that are swapped, missing or
//! renamed are an error that names them, not a silent mix-up of two
//! same-shaped adapters.
//!
//! Implemented for slices and `Vec`s of `(name, tensor)` and of
//! `(name, &mut tensor)` (tensors that live inside a model), with any
//! `AsRef<str>` name.

/// The tensors of a call, with their names: every trainable tensor, then
/// the W0 of each adapter registered for in-place weight-space perturbation
/// (those may be left out where the configuration does not perturb W0).
pub trait NamedTensors<T> {
    /// How many tensors the call gives.
    fn count(&self) -> usize;
    /// The name of tensor `i`.
    fn name(&self, i: usize) -> &str;
    /// Tensor `i`.
    fn tensor(&self, i: usize) -> &T;
    /// Tensor `i`, to update in place.
    fn tensor_mut(&mut self, i: usize) -> &mut T;
    /// Every tensor at once, in order (for the batched updates of a step).
    fn tensors_mut(&mut self) -> Vec<&mut T>;
}

/// The gradients of a step, with their names, in the order of the
/// trainable tensors; `None` (or a missing entry) where a tensor got none.
pub trait NamedGrads<T> {
    /// How many gradients the call gives.
    fn count(&self) -> usize;
    /// The name of gradient `i`.
    fn name(&self, i: usize) -> &str;
    /// Gradient `i`, if the backward pass produced one.
    fn grad(&self, i: usize) -> Option<&T>;
}

macro_rules! named_tensors {
    ($($ty:ty),*) => {$(
        impl<S: AsRef<str>, T> NamedTensors<T> for $ty {
            fn count(&self) -> usize {
                self.len()
            }
            fn name(&self, i: usize) -> &str {
                self[i].0.as_ref()
            }
            fn tensor(&self, i: usize) -> &T {
                &self[i].1
            }
            fn tensor_mut(&mut self, i: usize) -> &mut T {
                &mut self[i].1
            }
            fn tensors_mut(&mut self) -> Vec<&mut T> {
                self.iter_mut().map(|(_, t)| t).collect()
            }
        }
    )*};
}
named_tensors!([(S, T)], Vec<(S, T)>);

macro_rules! named_tensor_refs {
    ($($ty:ty),*) => {$(
        impl<S: AsRef<str>, T> NamedTensors<T> for $ty {
            fn count(&self) -> usize {
                self.len()
            }
            fn name(&self, i: usize) -> &str {
                self[i].0.as_ref()
            }
            fn tensor(&self, i: usize) -> &T {
                self[i].1
            }
            fn tensor_mut(&mut self, i: usize) -> &mut T {
                self[i].1
            }
            fn tensors_mut(&mut self) -> Vec<&mut T> {
                self.iter_mut().map(|(_, t)| &mut **t).collect()
            }
        }
    )*};
}
named_tensor_refs!([(S, &mut T)], Vec<(S, &mut T)>);

macro_rules! named_grads {
    ($get:expr; $($ty:ty),*) => {$(
        impl<S: AsRef<str>, T> NamedGrads<T> for $ty {
            fn count(&self) -> usize {
                self.len()
            }
            fn name(&self, i: usize) -> &str {
                self[i].0.as_ref()
            }
            fn grad(&self, i: usize) -> Option<&T> {
                self.get(i).and_then(|e| $get(&e.1))
            }
        }
    )*};
}
fn present<T>(g: &T) -> Option<&T> {
    Some(g)
}
fn optional<T>(g: &Option<T>) -> Option<&T> {
    g.as_ref()
}
fn borrowed<'a, T>(g: &&'a T) -> Option<&'a T> {
    Some(*g)
}
named_grads!(present; [(S, T)], Vec<(S, T)>);
named_grads!(optional; [(S, Option<T>)], Vec<(S, Option<T>)>);
named_grads!(borrowed; [(S, &T)], Vec<(S, &T)>);
