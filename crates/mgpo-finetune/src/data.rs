//! Labelled text: the default WordNet supersense task and user files
//! (CSV or JSONL with `text` and `label`), with fixed splits by seed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{io, FinetuneError, Result};
use crate::rng::SplitMix64;

/// One example: a text and the index of its label in [`Splits::labels`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// The input text.
    pub text: String,
    /// Index into the label names.
    pub label: usize,
}

/// Train, validation and test examples over one set of label names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Splits {
    /// Label names; a label index points here.
    pub labels: Vec<String>,
    /// Training examples.
    pub train: Vec<Example>,
    /// Validation examples (checkpoint selection).
    pub val: Vec<Example>,
    /// Test examples (reported once, at the chosen checkpoint).
    pub test: Vec<Example>,
}

/// The ten WordNet noun supersenses (lexicographer files) of the default
/// task: concrete and abstract classes that glosses tell apart.
pub const SUPERSENSES: [&str; 10] = [
    "noun.act",
    "noun.animal",
    "noun.artifact",
    "noun.body",
    "noun.communication",
    "noun.food",
    "noun.location",
    "noun.person",
    "noun.plant",
    "noun.substance",
];

/// WordNet 3.0's lexicographer file names by number (`lexnames(5WN)`),
/// nouns only: file 3 is `noun.Tops`, 28 `noun.time`.
const NOUN_LEXNAMES: [&str; 26] = [
    "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute", "noun.body", "noun.cognition",
    "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive",
    "noun.object", "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
];

/// Where Debian's `wordnet-base` installs the database.
pub const WORDNET_DIR: &str = "/usr/share/wordnet";

/// How many examples of each class go to each split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PerClass {
    /// Training examples per class.
    pub train: usize,
    /// Validation examples per class.
    pub val: usize,
    /// Test examples per class.
    pub test: usize,
}

/// One synset of `data.noun`: its supersense and its gloss's definition.
fn parse_noun_line(line: &str) -> std::result::Result<(String, String), String> {
    let (head, gloss) = line.split_once(" | ").ok_or("no ` | ` before the gloss")?;
    let mut fields = head.split(' ');
    let offset = fields.next().unwrap_or("");
    if offset.len() != 8 || !offset.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("synset offset `{offset}` is not 8 digits"));
    }
    let lex = fields.next().ok_or("no lexicographer file number")?;
    let n: usize = lex.parse().map_err(|_| format!("lexicographer file number `{lex}` is not a number"))?;
    let name = n.checked_sub(3).and_then(|i| NOUN_LEXNAMES.get(i)).ok_or(format!("lexicographer file {n} is not a noun file (3..=28)"))?;
    if fields.next() != Some("n") {
        return Err("synset type is not `n`".into());
    }
    // The definition: the gloss up to its first quoted example.
    let def = gloss.split('"').next().unwrap_or("").trim().trim_end_matches(';').trim();
    if def.is_empty() {
        return Err("empty gloss".into());
    }
    Ok((name.to_string(), def.to_string()))
}

/// The default task: glosses of WordNet noun synsets labelled by their
/// supersense, the ten [`SUPERSENSES`], `per_class` of each in each split
/// (balanced). Each class's synsets are shuffled by `seed` and cut in
/// order, so a seed fixes the splits. `data_noun` is WordNet 3.0's
/// `data.noun`; a line not in its format is [`FinetuneError::WordNet`].
pub fn wordnet(data_noun: &Path, per_class: PerClass, seed: u64) -> Result<Splits> {
    let text = std::fs::read_to_string(data_noun).map_err(io(data_noun))?;
    let mut by_class: BTreeMap<&str, Vec<String>> = SUPERSENSES.iter().map(|s| (*s, Vec::new())).collect();
    for (i, line) in text.lines().enumerate() {
        // The licence header lines start with two spaces.
        if line.starts_with("  ") || line.is_empty() {
            continue;
        }
        let (class, def) = parse_noun_line(line).map_err(|detail| FinetuneError::WordNet { path: data_noun.into(), line: i + 1, detail })?;
        if let Some(v) = by_class.get_mut(class.as_str()) {
            v.push(def);
        }
    }
    let labels: Vec<String> = SUPERSENSES.iter().map(|s| s.to_string()).collect();
    let need = per_class.train + per_class.val + per_class.test;
    let mut splits = Splits { labels, train: vec![], val: vec![], test: vec![] };
    for (label, name) in SUPERSENSES.iter().enumerate() {
        let mut defs = by_class.remove(name).unwrap_or_default();
        // Distinct synsets may share a definition: keep the first of each.
        let mut seen = std::collections::HashSet::new();
        defs.retain(|d| seen.insert(d.clone()));
        if defs.len() < need {
            return Err(FinetuneError::Data(format!("{}: {name} has {} glosses, {need} asked", data_noun.display(), defs.len())));
        }
        SplitMix64::new(seed ^ label as u64).shuffle(&mut defs);
        let mut it = defs.into_iter().map(|text| Example { text, label });
        splits.train.extend(it.by_ref().take(per_class.train));
        splits.val.extend(it.by_ref().take(per_class.val));
        splits.test.extend(it.by_ref().take(per_class.test));
    }
    Ok(splits)
}

/// Splits a file's examples into train / validation / test (80 / 10 / 10 %,
/// at least one example in each) after shuffling them by `seed`.
pub fn split(labels: Vec<String>, mut examples: Vec<Example>, seed: u64) -> Result<Splits> {
    if examples.len() < 3 {
        return Err(FinetuneError::Data(format!("{} examples: at least 3 are needed (train, validation, test)", examples.len())));
    }
    SplitMix64::new(seed).shuffle(&mut examples);
    let n = examples.len();
    let n_val = (n / 10).max(1);
    let n_test = (n / 10).max(1);
    let test = examples.split_off(n - n_test);
    let val = examples.split_off(n - n_test - n_val);
    Ok(Splits { labels, train: examples, val, test })
}

/// Reads `text,label` examples from a `.csv` (header naming both columns,
/// RFC 4180 quoting) or a `.jsonl` file (one object per line with string
/// `text` and string or integer `label`). Labels are named by their
/// strings, sorted. Every bad row is [`FinetuneError::BadRow`].
pub fn load_file(path: &Path) -> Result<(Vec<String>, Vec<Example>)> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    let rows = match ext.as_str() {
        "csv" => csv_rows(path, &text)?,
        "jsonl" | "ndjson" => jsonl_rows(path, &text)?,
        _ => return Err(FinetuneError::Data(format!("{}: the extension must be .csv or .jsonl", path.display()))),
    };
    if rows.is_empty() {
        return Err(FinetuneError::Data(format!("{}: no examples", path.display())));
    }
    let labels: Vec<String> = rows.iter().map(|(_, l)| l.clone()).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
    if labels.len() < 2 {
        return Err(FinetuneError::Data(format!("{}: one label only (`{}`); a classifier needs two or more", path.display(), labels[0])));
    }
    let examples = rows.into_iter().map(|(text, l)| Example { text, label: labels.binary_search(&l).expect("label collected above") }).collect();
    Ok((labels, examples))
}

fn bad(path: &Path, line: usize, detail: impl Into<String>) -> FinetuneError {
    FinetuneError::BadRow { path: PathBuf::from(path), line, detail: detail.into() }
}

/// One CSV record's fields (quotes doubled inside quoted fields).
fn csv_fields(line: &str) -> std::result::Result<Vec<String>, String> {
    let (mut fields, mut cur, mut chars) = (Vec::new(), String::new(), line.chars().peekable());
    let mut quoted = false;
    let mut was_quoted = false;
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                cur.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => cur.push(c),
            (false, '"') if cur.is_empty() && !was_quoted => {
                quoted = true;
                was_quoted = true;
            }
            (false, '"') => return Err("a quote inside an unquoted field".into()),
            (false, ',') => {
                fields.push(std::mem::take(&mut cur));
                was_quoted = false;
            }
            (false, c) if was_quoted => return Err(format!("`{c}` after a closing quote")),
            (false, c) => cur.push(c),
        }
    }
    if quoted {
        return Err("unterminated quoted field (fields may not span lines)".into());
    }
    fields.push(cur);
    Ok(fields)
}

fn csv_rows(path: &Path, text: &str) -> Result<Vec<(String, String)>> {
    let mut lines = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty());
    let (_, header) = lines.next().ok_or_else(|| FinetuneError::Data(format!("{}: empty file", path.display())))?;
    let header = csv_fields(header.trim_start_matches('\u{feff}')).map_err(|e| bad(path, 1, e))?;
    let col = |name: &str| header.iter().position(|h| h.trim() == name).ok_or_else(|| bad(path, 1, format!("no `{name}` column in the header {header:?}")));
    let (ti, li) = (col("text")?, col("label")?);
    let mut rows = Vec::new();
    for (i, line) in lines {
        let f = csv_fields(line).map_err(|e| bad(path, i + 1, e))?;
        if f.len() != header.len() {
            return Err(bad(path, i + 1, format!("{} fields, the header has {}", f.len(), header.len())));
        }
        rows.push(row(path, i + 1, f[ti].clone(), f[li].trim().to_string())?);
    }
    Ok(rows)
}

fn row(path: &Path, line: usize, text: String, label: String) -> Result<(String, String)> {
    if text.trim().is_empty() {
        return Err(bad(path, line, "empty text"));
    }
    if label.is_empty() {
        return Err(bad(path, line, "empty label"));
    }
    Ok((text, label))
}

fn jsonl_rows(path: &Path, text: &str) -> Result<Vec<(String, String)>> {
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| bad(path, i + 1, format!("not JSON: {e}")))?;
        let t = match v.get("text") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(_) => return Err(bad(path, i + 1, "`text` is not a string")),
            None => return Err(bad(path, i + 1, "no `text` field")),
        };
        let l = match v.get("label") {
            Some(serde_json::Value::String(s)) => s.trim().to_string(),
            Some(serde_json::Value::Number(n)) if n.is_u64() || n.is_i64() => n.to_string(),
            Some(_) => return Err(bad(path, i + 1, "`label` is not a string or an integer")),
            None => return Err(bad(path, i + 1, "no `label` field")),
        };
        rows.push(row(path, i + 1, t, l)?);
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, body: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mgpo-ft-data-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        p
    }

    #[test]
    fn csv_with_quotes_and_jsonl_read_alike() {
        let c = write("a.csv", "id,text,label\n1,\"a cat, \"\"small\"\"\",pos\n2,a dog,neg\n");
        let (labels, ex) = load_file(&c).unwrap();
        assert_eq!(labels, ["neg", "pos"]);
        assert_eq!(ex[0], Example { text: "a cat, \"small\"".into(), label: 1 });
        let j = write("a.jsonl", "{\"text\":\"a cat, \\\"small\\\"\",\"label\":\"pos\"}\n\n{\"text\":\"a dog\",\"label\":\"neg\"}\n");
        assert_eq!(load_file(&j).unwrap(), (labels, ex));
    }

    #[test]
    fn bad_rows_are_typed_with_their_line() {
        let cases = [
            ("b1.csv", "text,label\nok,a\n\"open,b\n", 3, "unterminated"),
            ("b2.csv", "text,label\nok,a\nx,y,z\n", 3, "3 fields"),
            ("b3.csv", "txt,label\nok,a\n", 1, "no `text` column"),
            ("b4.jsonl", "{\"text\":\"ok\",\"label\":1}\n{\"text\":3,\"label\":1}\n", 2, "not a string"),
            ("b5.jsonl", "{\"text\":\"ok\",\"label\":1}\nnope\n", 2, "not JSON"),
            ("b6.jsonl", "{\"text\":\"ok\",\"label\":1}\n{\"text\":\" \",\"label\":1}\n", 2, "empty text"),
        ];
        for (name, body, want_line, want) in cases {
            match load_file(&write(name, body)) {
                Err(FinetuneError::BadRow { line, detail, .. }) => assert!(line == want_line && detail.contains(want), "{name}: {line} {detail}"),
                other => panic!("{name}: {other:?}"),
            }
        }
        assert!(matches!(load_file(&write("one.csv", "text,label\na,x\nb,x\n")), Err(FinetuneError::Data(_))));
        assert!(matches!(load_file(&write("x.tsv", "text\tlabel\n")), Err(FinetuneError::Data(_))));
    }

    #[test]
    fn splits_are_fixed_by_seed_and_disjoint() {
        let ex: Vec<Example> = (0..50).map(|i| Example { text: format!("t{i}"), label: i % 2 }).collect();
        let a = split(vec!["a".into(), "b".into()], ex.clone(), 7).unwrap();
        assert_eq!(a, split(vec!["a".into(), "b".into()], ex.clone(), 7).unwrap());
        assert_ne!(a.train, split(vec!["a".into(), "b".into()], ex.clone(), 8).unwrap().train);
        assert_eq!((a.train.len(), a.val.len(), a.test.len()), (40, 5, 5));
        let mut all: Vec<_> = a.train.iter().chain(&a.val).chain(&a.test).map(|e| e.text.clone()).collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 50);
    }

    #[test]
    fn wordnet_lines_parse_and_bad_ones_are_typed() {
        let good = "00015388 05 n 01 animal 0 002 @ 00004475 n 0000 ~ 01313888 n 0000 | a living organism; \"an example\"  ";
        assert_eq!(parse_noun_line(good).unwrap(), ("noun.animal".into(), "a living organism".into()));
        assert!(parse_noun_line("00015388 45 n 01 x 0 000 | g").unwrap_err().contains("not a noun file"));
        assert!(parse_noun_line("0001538 05 n 01 x 0 000 | g").unwrap_err().contains("8 digits"));
        assert!(parse_noun_line("00015388 05 n 01 x 0 000 g").unwrap_err().contains("` | `"));
        let p = write("data.noun", &format!("  1 licence\n{good}\n00015389 05 v 01 x 0 000 | g\n"));
        match wordnet(&p, PerClass { train: 1, val: 0, test: 0 }, 0) {
            Err(FinetuneError::WordNet { line: 3, detail, .. }) => assert!(detail.contains("`n`")),
            other => panic!("{other:?}"),
        }
    }
}
