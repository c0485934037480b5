//! The conformance kit: every embedded vector and random property cases
//! against the float64 reference, for any backend, with the tolerances it
//! declares per element type.

use std::collections::BTreeMap;
use std::fmt;

use mgpo_core::backend::{noise, HostIo, TensorOps};

use crate::failure::{Failure, Suspect};
use crate::props::{check_agree, check_case, default_tolerance, kit_case};
use crate::run::{run_with, Outcome};
use crate::vector::{Dtype, Tolerance, Vector};

/// Property cases a suite runs unless told otherwise ([`Suite::cases`],
/// or the `PROPTEST_CASES` environment variable).
pub const DEFAULT_CASES: u32 = 64;

/// Failures of each failed vector a report's text shows (the first is the
/// most upstream; [`Outcome::failures`] keeps more).
const SHOWN_PER_VECTOR: usize = 2;

/// Failures of property cases a report keeps in full (all are counted).
const KEPT_CASE_FAILURES: usize = 8;

/// The conformance suite of one backend: the embedded vectors and
/// [`Suite::cases`] random property cases, with the strict tolerances
/// unless the backend declares its own for its element type.
///
/// ```
/// # use mgpo_conformance::{Dtype, Suite, Tolerance};
/// # fn demo<B: mgpo_core::backend::TensorOps + mgpo_core::backend::HostIo + Clone>(backend: B) {
/// // A bf16 backend: f32 for the kit, with a tolerance its rounding needs.
/// let report = Suite::new(backend).tolerance(Dtype::F32, Tolerance { rtol: 1e-2, atol: 1e-4 }).cases(32).run();
/// assert!(report.passed(), "{report}");
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Suite<B> {
    backend: B,
    declared: [Option<Tolerance>; 2],
    cases: u32,
    seed: Option<u64>,
}

/// A strict suite of `backend`: [`Suite::new`].
pub fn suite<B: TensorOps + HostIo + Clone>(backend: B) -> Suite<B> {
    Suite::new(backend)
}

/// The whole kit in one call: every vector and the property cases on
/// `backend` with the strict tolerances; panics with the [`Report`] on any
/// failure.
pub fn assert_conforms<B: TensorOps + HostIo + Clone>(backend: B) {
    Suite::new(backend).assert_passes();
}

fn index(dtype: Dtype) -> usize {
    match dtype {
        Dtype::F32 => 0,
        Dtype::F64 => 1,
    }
}

impl<B: TensorOps + HostIo + Clone> Suite<B> {
    /// The strict suite: each vector's own tolerance for the backend's
    /// element type, [`default_tolerance`] for the property cases,
    /// [`DEFAULT_CASES`] cases.
    pub fn new(backend: B) -> Self {
        Suite { backend, declared: [None, None], cases: DEFAULT_CASES, seed: None }
    }

    /// Declares the tolerance the backend needs when it computes in
    /// `dtype` (as [`Dtype::of`] finds it): bf16 or f16 storage, TF32
    /// matrix products, a GPU's reductions. It replaces every vector's own
    /// tolerance and the property cases' default for that dtype; a
    /// declaration for the other dtype has no effect. Reports say when it
    /// is looser than the strict defaults.
    pub fn tolerance(mut self, dtype: Dtype, tolerance: Tolerance) -> Self {
        self.declared[index(dtype)] = Some(tolerance);
        self
    }

    /// Runs `n` property cases (the `PROPTEST_CASES` environment variable,
    /// when set, overrides it).
    pub fn cases(mut self, n: u32) -> Self {
        self.cases = n;
        self
    }

    /// Fixes the base seed of the property cases, so every run draws the
    /// same cases (it takes precedence over `PROPTEST_RNG_SEED`); without
    /// it each run draws new ones.
    pub fn seed(mut self, base: u64) -> Self {
        self.seed = Some(base);
        self
    }

    /// The backend under test.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The element type the backend computes in ([`Dtype::of`]).
    pub fn dtype(&self) -> Dtype {
        Dtype::of(&self.backend)
    }

    /// The tolerance declared for the backend's dtype, if any.
    pub fn declared(&self) -> Option<Tolerance> {
        self.declared[index(self.dtype())]
    }

    /// The tolerance `v` is held to: the declared one, else the vector's
    /// own for the backend's dtype.
    pub fn vector_tolerance(&self, v: &Vector) -> Tolerance {
        self.declared().unwrap_or_else(|| v.tolerances.get(self.dtype()))
    }

    /// The tolerance property cases are held to: the declared one, else
    /// [`default_tolerance`].
    pub fn property_tolerance(&self) -> Tolerance {
        self.declared().unwrap_or_else(|| default_tolerance(self.dtype()))
    }

    /// Runs one vector.
    pub fn run_vector(&self, v: &Vector) -> Outcome {
        run_with(&self.backend, v, self.vector_tolerance(v))
    }

    /// Runs every embedded vector ([`crate::vectors`]).
    pub fn run_vectors(&self) -> Report {
        let vectors = crate::vectors::all().map(|(_, v)| self.run_vector(&v)).collect();
        Report { vectors: Some(vectors), properties: None, ..self.empty_report() }
    }

    /// Runs the property case of `seed` ([`crate::props::kit_case`])
    /// against the float64 reference: how a failure in a report is replayed.
    pub fn check_case(&self, seed: u64) -> Result<(), Failure> {
        check_case(&self.backend, &kit_case(seed), self.property_tolerance(), Some(seed))
    }

    /// Runs the property cases: `PROPTEST_CASES` or [`Suite::cases`] of
    /// them, case i of seed mix(base ^ mix(i + 1)) where the base is
    /// [`Suite::seed`], else `PROPTEST_RNG_SEED` when set (to replay a
    /// run), else random.
    pub fn run_properties(&self) -> Report {
        let (base, cases) = self.case_seeds();
        let mut p = Properties { base_seed: base, cases, failed: 0, failures: Vec::new() };
        for i in 0..cases as u64 {
            if let Err(f) = self.check_case(case_seed(base, i)) {
                p.failed += 1;
                if p.failures.len() < KEPT_CASE_FAILURES {
                    p.failures.push(f);
                }
            }
        }
        Report { vectors: None, properties: Some(p), ..self.empty_report() }
    }

    /// The base seed and the number of the property cases (see
    /// [`Suite::run_properties`]).
    fn case_seeds(&self) -> (u64, u32) {
        let base = self.seed.or_else(|| env_u64("PROPTEST_RNG_SEED")).unwrap_or_else(random_seed);
        (base, env_u64("PROPTEST_CASES").map_or(self.cases, |n| n.min(u32::MAX as u64) as u32))
    }

    /// Runs the property cases of [`Suite::run_properties`] on the backend
    /// and on `other` in lockstep ([`crate::props::check_agree`]): after
    /// every perturb, step and unperturb both hold the same values within
    /// the default tolerance of the less precise one. For a backend with a
    /// trusted sibling (another path of the same library, or mgpo-ndarray),
    /// this pins down differences the reference's looser bound lets pass.
    /// Panics naming each disagreeing case's seed and what differs.
    pub fn assert_agrees_with<R: TensorOps + HostIo + Clone>(&self, other: &R) {
        let (base, cases) = self.case_seeds();
        let failed: Vec<String> = (0..cases as u64)
            .map(|i| case_seed(base, i))
            .filter_map(|seed| check_agree(&self.backend, other, &kit_case(seed)).err().map(|e| format!("case seed {seed}: {e}")))
            .collect();
        assert!(
            failed.is_empty(),
            "{} and {} disagree on {} of {cases} cases (replay with PROPTEST_RNG_SEED={base} PROPTEST_CASES={cases}):\n{}",
            std::any::type_name::<B>(),
            std::any::type_name::<R>(),
            failed.len(),
            failed.iter().take(KEPT_CASE_FAILURES).cloned().collect::<Vec<_>>().join("\n")
        );
    }

    /// The vectors and the property cases.
    pub fn run(&self) -> Report {
        Report { vectors: self.run_vectors().vectors, properties: self.run_properties().properties, ..self.empty_report() }
    }

    /// Every vector passes, or a panic with the report.
    pub fn assert_vectors(&self) {
        self.run_vectors().assert_passed();
    }

    /// Every property case passes, or a panic with the report.
    pub fn assert_properties(&self) {
        self.run_properties().assert_passed();
    }

    /// The whole suite passes, or a panic with the report.
    pub fn assert_passes(&self) {
        self.run().assert_passed();
    }

    fn empty_report(&self) -> Report {
        let dtype = self.dtype();
        let looser = self.declared().map_or(0, |d| {
            let strict = crate::vectors::all().map(|(_, v)| v.tolerances.get(dtype)).chain([default_tolerance(dtype)]);
            strict.filter(|s| d.rtol > s.rtol || d.atol > s.atol).count()
        });
        Report { backend: std::any::type_name::<B>().to_string(), dtype, declared: self.declared(), looser_than: looser, property_tolerance: self.property_tolerance(), vectors: None, properties: None }
    }
}

/// The seed of property case `i` of a run with base seed `base`.
fn case_seed(base: u64, i: u64) -> u64 {
    noise::mix(base ^ noise::mix(i + 1))
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

/// A seed that differs between runs: std's randomly keyed hasher.
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    h.finish()
}

/// What the property cases of a suite found.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Properties {
    /// The base seed (`PROPTEST_RNG_SEED=<base>` replays the run).
    pub base_seed: u64,
    /// Cases run.
    pub cases: u32,
    /// Cases that failed.
    pub failed: u32,
    /// The first failure of each of the first failed cases (at most eight).
    pub failures: Vec<Failure>,
}

/// What a [`Suite`] found: per vector and over the property cases, with
/// the tolerances used and the methods most likely at fault.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Report {
    /// The backend's type.
    pub backend: String,
    /// The element type it was checked as.
    pub dtype: Dtype,
    /// The tolerance it declared for that dtype, if any.
    pub declared: Option<Tolerance>,
    /// How many of the strict tolerances (the vectors' own and the property
    /// default) the declared one is looser than, in rtol or atol.
    pub looser_than: usize,
    /// The tolerance of the property cases.
    pub property_tolerance: Tolerance,
    /// Each vector's outcome, when the vectors ran.
    pub vectors: Option<Vec<Outcome>>,
    /// The property cases, when they ran.
    pub properties: Option<Properties>,
}

impl Report {
    /// Nothing failed.
    pub fn passed(&self) -> bool {
        self.failed_vectors() == 0 && self.failed_cases() == 0
    }

    /// Vectors that failed.
    pub fn failed_vectors(&self) -> usize {
        self.vectors.as_ref().map_or(0, |v| v.iter().filter(|o| !o.passed()).count())
    }

    /// Property cases that failed.
    pub fn failed_cases(&self) -> u32 {
        self.properties.as_ref().map_or(0, |p| p.failed)
    }

    /// How often each method is the suspect of a failed vector's or a
    /// kept failed case's first failure, most frequent first.
    pub fn suspects(&self) -> Vec<(Suspect, usize)> {
        let mut n: BTreeMap<String, (Suspect, usize)> = BTreeMap::new();
        let vectors = self.vectors.iter().flatten().filter_map(Outcome::suspect);
        let cases = self.properties.iter().flat_map(|p| p.failures.iter().map(|f| f.suspect));
        for s in vectors.chain(cases) {
            n.entry(format!("{s:?}")).or_insert((s, 0)).1 += 1;
        }
        let mut v: Vec<(Suspect, usize)> = n.into_values().collect();
        v.sort_by(|a, b| b.1.cmp(&a.1));
        v
    }

    /// The method most likely at fault: the most frequent suspect of
    /// [`Report::suspects`] (see [`Suspect`] for how one failure is blamed).
    pub fn suspect(&self) -> Option<Suspect> {
        self.suspects().first().map(|s| s.0)
    }

    /// Panics with the report when anything failed; prints it otherwise
    /// (shown by `cargo test -- --nocapture`).
    pub fn assert_passed(&self) {
        assert!(self.passed(), "conformance failures:\n{self}");
        println!("{self}");
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dt = self.dtype.as_str();
        writeln!(f, "conformance of {} as {dt}", self.backend)?;
        match self.declared {
            Some(t) if self.looser_than > 0 => writeln!(
                f,
                "tolerance: DECLARED rtol {:e}, atol {:e} for {dt}, looser than {} of the strict ones (the vectors' own, the property default)",
                t.rtol, t.atol, self.looser_than
            )?,
            Some(t) => writeln!(f, "tolerance: declared rtol {:e}, atol {:e} for {dt}, no looser than any strict one", t.rtol, t.atol)?,
            None => writeln!(f, "tolerance: strict (each vector's own for {dt}; property cases rtol {:e}, atol {:e})", self.property_tolerance.rtol, self.property_tolerance.atol)?,
        }
        if let Some(vs) = &self.vectors {
            writeln!(f, "vectors: {} of {} pass", vs.len() - self.failed_vectors(), vs.len())?;
            for o in vs.iter().filter(|o| !o.passed()) {
                let failing: Vec<String> = o.quantities.iter().filter(|q| q.failed > 0).map(|q| format!("{} x{}", q.quantity, q.failed)).collect();
                writeln!(f, "  FAIL {} ({}; tolerance rtol {:e}, atol {:e})", o.name, failing.join(", "), o.tolerance.rtol, o.tolerance.atol)?;
                for x in o.failures.iter().take(SHOWN_PER_VECTOR) {
                    writeln!(f, "    {x}")?;
                }
                if o.failures.len() > SHOWN_PER_VECTOR {
                    writeln!(f, "    ... (`Outcome::failures` keeps the first {})", o.failures.len())?;
                }
            }
        }
        if let Some(p) = &self.properties {
            writeln!(f, "property cases: {} of {} pass (rtol {:e}, atol {:e}; replay with PROPTEST_RNG_SEED={} PROPTEST_CASES={})", p.cases - p.failed, p.cases, self.property_tolerance.rtol, self.property_tolerance.atol, p.base_seed, p.cases)?;
            for x in &p.failures {
                writeln!(f, "    {x}")?;
            }
        }
        let suspects = self.suspects();
        if let Some((s, n)) = suspects.first() {
            let total: usize = suspects.iter().map(|x| x.1).sum();
            writeln!(f, "most likely at fault: {s} (first failure of {n} of {total} failed runs)")?;
        }
        Ok(())
    }
}

/// What [`conformance_tests!`](crate::conformance_tests) accepts: a
/// backend (a strict [`Suite`] of it) or a configured [`Suite`].
pub trait IntoSuite {
    /// The backend under test.
    type Backend: TensorOps + HostIo + Clone;
    /// The suite.
    fn into_suite(self) -> Suite<Self::Backend>;
}

impl<B: TensorOps + HostIo + Clone> IntoSuite for B {
    type Backend = B;
    fn into_suite(self) -> Suite<B> {
        Suite::new(self)
    }
}

impl<B: TensorOps + HostIo + Clone> IntoSuite for Suite<B> {
    type Backend = B;
    fn into_suite(self) -> Suite<B> {
        self
    }
}

/// Generates the conformance tests of one or more backends: for each
/// `name => backend_or_suite`, a module `name` with two `#[test]`s,
/// `vectors` (every embedded vector) and `properties` (the property cases
/// against the float64 reference). The expression is a backend (checked
/// strictly) or a [`Suite`] (with declared tolerances or another number of
/// cases); it is evaluated inside the module, which sees the file's items
/// and imports.
///
/// ```ignore
/// mgpo_conformance::conformance_tests! {
///     vec_f32 => VecBackend::<f32>::default(),
///     vec_f64 => VecBackend::<f64>::default(),
///     vec_bf16 => Suite::new(VecBackend::<half::bf16>::default()).tolerance(Dtype::F32, Tolerance { rtol: 1e-2, atol: 1e-4 }),
/// }
/// ```
///
/// After the backends, `agree:` and pairs `name => (backend, other)` add
/// a test `name` each that runs the property cases on both in lockstep
/// ([`Suite::assert_agrees_with`]), e.g. a backend against mgpo-ndarray.
///
/// ```ignore
/// mgpo_conformance::conformance_tests! {
///     fused_f32 => cpu_f32(),
///     fused_f64 => cpu_f64();
///     agree: f32_agrees_with_ndarray => (cpu_f32(), NdBackend::<f32>::new()),
/// }
/// ```
///
/// Module names must not be those of primitive types (`f32`, `f64`):
/// they would shadow them in the file.
#[macro_export]
macro_rules! conformance_tests {
    ($($name:ident => $suite:expr),+ $(,)?) => {$(
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            /// Every embedded conformance vector.
            #[test]
            fn vectors() {
                $crate::IntoSuite::into_suite($suite).assert_vectors();
            }

            /// Random cases, step by step against the float64 reference.
            #[test]
            fn properties() {
                $crate::IntoSuite::into_suite($suite).assert_properties();
            }
        }
    )+};
    ($($name:ident => $suite:expr),+; agree: $($pair:ident => ($a:expr, $b:expr)),+ $(,)?) => {
        $crate::conformance_tests!($($name => $suite),+);
        $(
            /// Random cases on both backends in lockstep.
            #[test]
            fn $pair() {
                $crate::IntoSuite::into_suite($a).assert_agrees_with(&$b);
            }
        )+
    };
}
