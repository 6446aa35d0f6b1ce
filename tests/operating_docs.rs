//! docs/OPERATING.md's settings table and the code agree: every setting of
//! `privcomm serve` is in the table with its flag and default, and every row
//! of the table is a setting the code reads.

use clap::Args as _;
use std::collections::BTreeMap;

const OPERATING: &str = include_str!("../docs/OPERATING.md");
const MAIN: &str = include_str!("../src/main.rs");

/// Settings read outside `ServeConfig`, with where the code reads them.
const ENV_ONLY: [(&str, &str); 2] = [
    // main.rs builds the log filter from it.
    ("RUST_LOG", "EnvFilter::try_from_env(\"RUST_LOG\")"),
    // tokio's multi-thread runtime (#[tokio::main]) reads it itself.
    ("TOKIO_WORKER_THREADS", "#[tokio::main]"),
];

struct Row {
    flag: String,
    default: String,
}

/// `variable → (flag, default)` from the table under "## Settings".
fn documented() -> BTreeMap<String, Row> {
    let section = OPERATING.split("\n## Settings\n").nth(1).expect("docs/OPERATING.md has a \"## Settings\" section");
    let section = section.split("\n## ").next().unwrap_or(section);
    let mut rows = BTreeMap::new();
    for line in section.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let unquote = |cell: &str| cell.trim_matches('`').to_owned();
        let previous = rows.insert(unquote(cells[1]), Row { flag: unquote(cells[2]), default: unquote(cells[3]) });
        assert!(previous.is_none(), "{} is in the table twice", cells[1]);
    }
    assert!(!rows.is_empty(), "no table rows found under \"## Settings\"");
    rows
}

#[test]
fn every_setting_of_serve_is_documented_with_its_flag_and_default() {
    let documented = documented();
    let command = privcomm::config::ServeConfig::augment_args(clap::Command::new("serve"));
    let mut in_code = Vec::new();
    for arg in command.get_arguments() {
        let env = arg.get_env().unwrap_or_else(|| panic!("--{:?} has no environment variable", arg.get_long()));
        let env = env.to_string_lossy().into_owned();
        let flag = format!("--{}", arg.get_long().expect("every setting has a long flag"));
        let row = documented
            .get(&env)
            .unwrap_or_else(|| panic!("{env} ({flag}) is a setting of `privcomm serve` but not in docs/OPERATING.md"));
        assert_eq!(row.flag, flag, "{env}: the table names another flag");
        let defaults: Vec<String> = arg.get_default_values().iter().map(|v| v.to_string_lossy().into_owned()).collect();
        if !defaults.is_empty() && !arg.is_hide_default_value_set() {
            assert_eq!(row.default, defaults.join(","), "{env}: the table's default is not the code's");
        } else {
            assert!(
                row.default.contains("unset") || !row.default.starts_with(char::is_numeric),
                "{env} has no visible default in the code, yet the table gives {:?}",
                row.default
            );
        }
        in_code.push(env);
    }
    for (env, row) in &documented {
        if in_code.contains(env) {
            continue;
        }
        let (_, evidence) = ENV_ONLY
            .iter()
            .find(|(name, _)| name == env)
            .unwrap_or_else(|| panic!("docs/OPERATING.md documents {env}, which `privcomm serve` does not read"));
        assert_eq!(row.flag, "—", "{env} is documented with a flag the code does not have");
        assert!(MAIN.contains(evidence), "{env}: src/main.rs no longer reads it ({evidence})");
    }
}

#[test]
fn the_documented_log_filter_default_is_the_code_s() {
    let documented = documented();
    let rust_log = &documented["RUST_LOG"].default;
    assert!(MAIN.contains(&format!("\"{rust_log}\"")), "src/main.rs's default log filter is not {rust_log:?}");
}
