//! The variable names other tools depend on: every `FLOODGATE_*` name used in
//! `.env.example`, the compose files, the Dockerfile and the README is one the
//! binary reads (a typo there would silently leave a default in force), every
//! variable the binary reads is documented, and `.env.example`'s values are
//! the built-in defaults.

use std::collections::BTreeSet;
use std::path::Path;

use floodgate::settings::{Settings, env_vars};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(name: &str) -> String {
    std::fs::read_to_string(root().join(name)).unwrap_or_else(|e| panic!("reading {name}: {e}"))
}

/// Every `FLOODGATE_[A-Z0-9_]+` token in `text`.
fn names_in(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("FLOODGATE_") {
        let tail = &rest[i..];
        let len = tail
            .bytes()
            .take_while(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || *b == b'_')
            .count();
        names.insert(tail[..len].trim_end_matches('_').to_owned());
        rest = &tail[len.max(1)..];
    }
    names
}

/// Files that name floodgate variables for operators.
fn operator_files() -> Vec<String> {
    let mut files = vec![".env.example".to_owned(), "README.md".to_owned()];
    for entry in std::fs::read_dir(root()).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        let compose = (name.starts_with("docker-compose") || name.starts_with("compose"))
            && (name.ends_with(".yml") || name.ends_with(".yaml"));
        if compose || name == "Dockerfile" {
            files.push(name);
        }
    }
    files
}

#[test]
fn every_floodgate_variable_in_operator_files_is_known() {
    let known: BTreeSet<String> = env_vars().collect();
    let mut unknown = Vec::new();
    for file in operator_files() {
        for name in names_in(&read(&file)) {
            // The bare prefix, test knobs and the bench harness's own variables.
            let not_a_setting = name == "FLOODGATE" || name.starts_with("FLOODGATE_TEST");
            if not_a_setting || name == "FLOODGATE_BIN" || name == "FLOODGATE_DIR" {
                continue;
            }
            if !known.contains(&name) {
                unknown.push(format!("{file}: {name}"));
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "unknown variables (typos?):\n{}",
        unknown.join("\n")
    );
}

#[test]
fn every_known_variable_is_documented() {
    let env_example = names_in(&read(".env.example"));
    let readme = names_in(&read("README.md"));
    for name in env_vars() {
        assert!(env_example.contains(&name), ".env.example lacks {name}");
        assert!(readme.contains(&name), "README.md lacks {name}");
    }
}

#[test]
fn env_example_values_are_the_defaults() {
    let vars: Vec<(String, String)> = read(".env.example")
        .lines()
        .filter(|l| l.starts_with("FLOODGATE_"))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    assert!(vars.len() >= 20, "{vars:?}");
    let from_example =
        Settings::load(vars).unwrap_or_else(|e| panic!(".env.example is invalid:\n{e}"));
    assert_eq!(from_example, Settings::default());
}
