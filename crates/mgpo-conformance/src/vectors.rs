//! The project's conformance vectors, embedded in the crate: every file of
//! the package's `vectors/` directory, so a copy of the crate from a
//! registry carries them. The format is [the spec](mgpo_core::spec)'s ("Conformance
//! vectors"); each vector is named after its file, without `.json`.
//!
//! ```
//! let v = mgpo_conformance::vectors::by_name("param-groups").expect("embedded");
//! assert_eq!(v.param_groups[0].name, "no_decay");
//! assert!(mgpo_conformance::vectors::names().count() >= 30);
//! ```

use crate::vector::Vector;

/// (name, JSON text), sorted by name.
static VECTORS: &[(&str, &str)] = include!(concat!(env!("OUT_DIR"), "/vectors.rs"));

/// Every vector's name, sorted.
pub fn names() -> impl Iterator<Item = &'static str> {
    VECTORS.iter().map(|(n, _)| *n)
}

/// The JSON text of the vector called `name`.
pub fn json(name: &str) -> Option<&'static str> {
    VECTORS.iter().find(|(n, _)| *n == name).map(|(_, j)| *j)
}

/// The vector called `name`, parsed and checked.
pub fn by_name(name: &str) -> Option<Vector> {
    json(name).map(|j| parse(name, j))
}

/// Every vector, sorted by name, parsed and checked.
pub fn all() -> impl Iterator<Item = (&'static str, Vector)> {
    VECTORS.iter().map(|(n, j)| (*n, parse(n, j)))
}

/// The embedded files are this crate's own data, every one of which its
/// tests parse (`every_embedded_vector_parses`); a failure here is a broken
/// build of the crate, not bad input.
fn parse(name: &str, json: &str) -> Vector {
    Vector::from_json(json).unwrap_or_else(|e| panic!("embedded vector {name} is invalid: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_embedded_vector_parses_and_is_named_after_its_file() {
        let names: Vec<&str> = names().collect();
        assert!(names.windows(2).all(|w| w[0] < w[1]), "sorted and unique");
        for (name, text) in VECTORS {
            let v = Vector::from_json(text).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(v.name, *name, "a vector's name is its file's name");
        }
        assert!(by_name("no-such-vector").is_none());
        assert_eq!(by_name("rho-zero").map(|v| v.steps.len()), Some(6));
    }

    /// The embedded list is the directory's content.
    #[test]
    fn embeds_every_file_of_the_directory() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("vectors");
        let mut files: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
            .collect();
        files.sort();
        assert_eq!(files, names().collect::<Vec<_>>());
    }

    /// The four vectors of the original external example set are embedded
    /// unchanged, and every new kind of vector is there.
    #[test]
    fn holds_the_example_set_and_the_new_kinds() {
        for name in ["nan-gradient-skips", "official-weight-peradapter-descent", "paper-adapter-global-ascent", "rho-zero-is-adamw"] {
            assert!(json(name).is_some(), "{name}");
        }
        let all: Vec<(&str, Vector)> = all().collect();
        let numel = |v: &Vector| -> usize {
            v.adapters.iter().map(|a| a.a.numel().max(a.b.numel())).chain(v.plain.iter().map(|p| p.tensor.numel())).max().unwrap_or(0)
        };
        let has = |what: &str, f: &dyn Fn(&Vector) -> bool| assert!(all.iter().any(|(_, v)| f(v)), "no vector with {what}");
        has("plain tensors", &|v| !v.plain.is_empty());
        has("two parameter groups", &|v| !v.param_groups.is_empty());
        has("the Gaussian direction", &|v| v.config.perturbation != mgpo_core::Perturbation::Momentum);
        has("a large adapter-space tensor", &|v| v.config.space == mgpo_core::Space::Adapter && numel(v) >= 10_000);
        has("a large weight-space tensor", &|v| v.config.space == mgpo_core::Space::Weight && numel(v) >= 10_000);
        has("f64 tolerance about 1e-12", &|v| v.tolerances.f64.rtol <= 1e-12);
    }
}
