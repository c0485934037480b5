//! The default task on the real WordNet 3.0 (scripts/setup-wordnet.sh
//! installs Debian's wordnet-base; missing, the test fails).

use std::path::Path;

use mgpo_finetune::data::{wordnet, PerClass, SUPERSENSES, WORDNET_DIR};

#[test]
fn wordnet_supersenses_are_balanced_disjoint_and_fixed_by_seed() {
    let path = Path::new(WORDNET_DIR).join("data.noun");
    assert!(path.is_file(), "no {} (run scripts/setup-wordnet.sh)", path.display());
    let per = PerClass { train: 100, val: 30, test: 50 };
    let a = wordnet(&path, per, 0).unwrap();
    assert_eq!(a.labels, SUPERSENSES.map(String::from));
    assert_eq!((a.train.len(), a.val.len(), a.test.len()), (1000, 300, 500));
    for l in 0..10 {
        assert_eq!(a.test.iter().filter(|e| e.label == l).count(), 50, "{}", SUPERSENSES[l]);
    }
    let mut texts: Vec<&str> = a.train.iter().chain(&a.val).chain(&a.test).map(|e| e.text.as_str()).collect();
    texts.sort();
    texts.dedup();
    assert_eq!(texts.len(), 1800, "no gloss in two splits");
    assert_eq!(a, wordnet(&path, per, 0).unwrap());
    assert_ne!(a.train, wordnet(&path, per, 1).unwrap().train);
    // A request larger than the smallest class (noun.body, about 2000 glosses) is refused.
    assert!(wordnet(&path, PerClass { train: 5000, val: 0, test: 0 }, 0).is_err());
}
