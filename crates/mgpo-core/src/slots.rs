//! How the caller hands tensors to the optimizer: any indexable collection of
//! tensors (or of `&mut` tensors, when they live inside a model), in the
//! order of the [`crate::Layout`].

/// Mutable access to the parameters (or the frozen weights) by index.
pub trait Slots<T> {
    fn count(&self) -> usize;
    fn slot(&self, i: usize) -> &T;
    fn slot_mut(&mut self, i: usize) -> &mut T;
    /// Every slot at once, in order (for the batched updates of a step).
    fn slots_mut(&mut self) -> Vec<&mut T>;
}

impl<T> Slots<T> for [T] {
    fn count(&self) -> usize {
        self.len()
    }
    fn slot(&self, i: usize) -> &T {
        &self[i]
    }
    fn slot_mut(&mut self, i: usize) -> &mut T {
        &mut self[i]
    }
    fn slots_mut(&mut self) -> Vec<&mut T> {
        self.iter_mut().collect()
    }
}

impl<T> Slots<T> for Vec<T> {
    fn count(&self) -> usize {
        self.len()
    }
    fn slot(&self, i: usize) -> &T {
        &self[i]
    }
    fn slot_mut(&mut self, i: usize) -> &mut T {
        &mut self[i]
    }
    fn slots_mut(&mut self) -> Vec<&mut T> {
        self.iter_mut().collect()
    }
}

impl<T> Slots<T> for [&mut T] {
    fn count(&self) -> usize {
        self.len()
    }
    fn slot(&self, i: usize) -> &T {
        self[i]
    }
    fn slot_mut(&mut self, i: usize) -> &mut T {
        self[i]
    }
    fn slots_mut(&mut self) -> Vec<&mut T> {
        self.iter_mut().map(|t| &mut **t).collect()
    }
}

impl<T> Slots<T> for Vec<&mut T> {
    fn count(&self) -> usize {
        self.len()
    }
    fn slot(&self, i: usize) -> &T {
        self[i]
    }
    fn slot_mut(&mut self, i: usize) -> &mut T {
        self[i]
    }
    fn slots_mut(&mut self) -> Vec<&mut T> {
        self.iter_mut().map(|t| &mut **t).collect()
    }
}

/// Read access to the gradients by index; `None` where a tensor got none.
pub trait GradSlots<T> {
    fn count(&self) -> usize;
    fn grad(&self, i: usize) -> Option<&T>;
}

impl<T> GradSlots<T> for [T] {
    fn count(&self) -> usize {
        self.len()
    }
    fn grad(&self, i: usize) -> Option<&T> {
        self.get(i)
    }
}

impl<T> GradSlots<T> for Vec<T> {
    fn count(&self) -> usize {
        self.len()
    }
    fn grad(&self, i: usize) -> Option<&T> {
        self.get(i)
    }
}

impl<T> GradSlots<T> for [Option<T>] {
    fn count(&self) -> usize {
        self.len()
    }
    fn grad(&self, i: usize) -> Option<&T> {
        self.get(i).and_then(Option::as_ref)
    }
}

impl<T> GradSlots<T> for Vec<Option<T>> {
    fn count(&self) -> usize {
        self.len()
    }
    fn grad(&self, i: usize) -> Option<&T> {
        self.get(i).and_then(Option::as_ref)
    }
}

impl<T> GradSlots<T> for [&T] {
    fn count(&self) -> usize {
        self.len()
    }
    fn grad(&self, i: usize) -> Option<&T> {
        self.get(i).copied()
    }
}

impl<T> GradSlots<T> for Vec<&T> {
    fn count(&self) -> usize {
        self.len()
    }
    fn grad(&self, i: usize) -> Option<&T> {
        self.get(i).copied()
    }
}

/// No tensors: the `frozen` argument when no adapter has a W0 in place
/// (adapter space, or weight space in factored form).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoFrozen;

impl<T> Slots<T> for NoFrozen {
    fn count(&self) -> usize {
        0
    }
    fn slot(&self, i: usize) -> &T {
        unreachable!("NoFrozen has no slot {i}: the optimizer checks counts first")
    }
    fn slot_mut(&mut self, i: usize) -> &mut T {
        unreachable!("NoFrozen has no slot {i}: the optimizer checks counts first")
    }
    fn slots_mut(&mut self) -> Vec<&mut T> {
        Vec::new()
    }
}
