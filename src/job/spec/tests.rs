//! The job file: what parses, what is refused and why, and properties over job-shaped documents.
use super::*;
use proptest::prelude::*;

const MINIMAL: &str = r#"
    [keys]
    source = "env"
    [[target]]
    table = "patient_persons"
    primary_key = ["id"]
    columns = ["phone_encrypted"]
    format = "versioned-gcm"
"#;

#[test]
fn parses_the_design_example() {
    let spec = JobSpec::parse(MINIMAL).unwrap();
    assert_eq!(spec.targets[0].columns, ["phone_encrypted"]);
}

#[test]
fn unknown_field_is_refused() {
    let err = JobSpec::parse(&MINIMAL.replace("format =", "formt = \"x\"\nformat =")).unwrap_err();
    assert!(err.to_string().contains("formt"), "{err}");
}

#[test]
fn duplicate_column_is_refused() {
    let twice = format!("{MINIMAL}\n[[target]]\ntable = \"patient_persons\"\ncolumns = [\"phone_encrypted\"]\nformat = \"versioned-gcm\"\n");
    assert!(JobSpec::parse(&twice)
        .unwrap_err()
        .to_string()
        .contains("listed twice"));
}

#[test]
fn a_job_name_that_is_not_a_file_name_is_refused() {
    for bad in [
        "",
        "../../elsewhere",
        "/abs/path",
        "a\\\\b",
        "..",
        "x\\u0000",
    ] {
        let err = JobSpec::parse(&format!("name = \"{bad}\"\n{MINIMAL}"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("names the job's audit log"), "{bad}: {err}");
    }
    assert!(JobSpec::parse(&format!("name = \"nightly eu-1 (j'ob)\"\n{MINIMAL}")).is_ok());
}

#[test]
fn a_name_with_a_nul_character_is_refused() {
    for (from, to) in [
        ("\"patient_persons\"", "\"pa\\u0000tients\""),
        ("[\"phone_encrypted\"]", "[\"ph\\u0000\"]"),
        ("[\"id\"]", "[\"\\u0000\"]"),
    ] {
        let err = JobSpec::parse(&MINIMAL.replacen(from, to, 1))
            .unwrap_err()
            .to_string();
        assert!(err.contains("contains a NUL character"), "{err}");
    }
}

#[test]
fn a_name_longer_than_postgresql_keeps_is_refused() {
    let long = "x".repeat(64);
    for (from, to) in [
        ("\"patient_persons\"", format!("\"{long}\"")),
        ("\"patient_persons\"", format!("\"{long}.t\"")),
        ("[\"id\"]", format!("[\"{long}\"]")),
    ] {
        let err = JobSpec::parse(&MINIMAL.replacen(from, &to, 1))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("is 64 bytes, and PostgreSQL keeps only the first 63"),
            "{err}"
        );
    }
    assert!(JobSpec::parse(&MINIMAL.replacen(
        "\"patient_persons\"",
        &format!("\"{}\"", &long[..63]),
        1
    ))
    .is_ok());
}

#[test]
fn schema_qualified_table_splits() {
    let spec =
        JobSpec::parse(&MINIMAL.replace("\"patient_persons\"", "\"phi.patient_persons\"")).unwrap();
    assert_eq!(
        spec.targets[0].split_table(),
        (Some("phi"), "patient_persons")
    );
}

#[test]
fn spec_hash_ignores_the_database_url() {
    let a = JobSpec::parse(MINIMAL).unwrap();
    let b = JobSpec::parse(&format!("[database]\nurl = \"postgres://x\"\n{MINIMAL}")).unwrap();
    assert_eq!(a.spec_hash(), b.spec_hash());
}

#[test]
fn spec_hash_is_pinned() {
    // Stored with every job: computed by the sha2 crate before hashing
    // moved to ring; a change would refuse every job resumed after an upgrade.
    assert_eq!(
        JobSpec::parse(MINIMAL).unwrap().spec_hash(),
        "bbdce3faff76918d70d9391cea82bcaf779b3d69d90b90884f933aaf7f29f638"
    );
}

/// Names as a job file might give them, hostile ones included.
const NAMES: [&str; 9] = [
    "patients",
    "phi.patients",
    "a.b.c",
    "",
    " ",
    ".",
    "pa\"tients; DROP TABLE canary; --",
    "Ünïcødé 表",
    "id",
];
/// Column names, few enough that targets repeat them.
const COLUMNS: [&str; 5] = ["a", "b", "id", "c\"; --", ""];

fn text(values: &'static [&'static str]) -> impl Strategy<Value = toml::Value> {
    prop_oneof![40 => prop::sample::select(values).prop_map(|s| toml::Value::String(s.into())), 1 => "\\PC{0,16}".prop_map(toml::Value::String)]
}

fn list(values: &'static [&'static str]) -> impl Strategy<Value = toml::Value> {
    proptest::collection::vec(
        prop::sample::select(values).prop_map(|s| toml::Value::String(s.into())),
        0..4,
    )
    .prop_map(toml::Value::Array)
}

/// An optional field: present with a value from `value`, or absent.
fn maybe<S: Strategy>(value: S) -> impl Strategy<Value = Option<S::Value>> {
    proptest::option::weighted(0.5, value)
}

/// An unknown field, once in a while.
fn rarely<S: Strategy>(value: S) -> impl Strategy<Value = Option<S::Value>> {
    proptest::option::weighted(0.05, value)
}

fn keys() -> impl Strategy<Value = toml::Value> {
    (
        text(&[
            "env",
            "env",
            "env",
            "env",
            "file",
            "tink-keyset",
            "aws-kms",
            "vault",
        ]),
        maybe(text(&["ENCRYPTION", "APP"])),
        rarely(Just(toml::Value::Integer(1))),
    )
        .prop_map(|(source, prefix, junk)| {
            let mut t = toml::Table::new();
            t.insert("source".into(), source);
            t.extend(prefix.map(|p| ("prefix".to_string(), p)));
            t.extend(junk.map(|j| ("sauce".to_string(), j)));
            toml::Value::Table(t)
        })
}

fn condition() -> impl Strategy<Value = toml::Value> {
    text(&[
        "id <= 100",
        "1=1) OR (true",
        "; DROP TABLE canary",
        "x = '\\'' ) OR (true OR x = '\\''",
        "a -- b",
        "name = 'it''s'",
    ])
}

fn target() -> impl Strategy<Value = toml::Value> {
    (
        (
            text(&NAMES),
            maybe(text(&["public", "phi"])),
            maybe(list(&COLUMNS)),
            list(&COLUMNS),
        ),
        (
            text(&[
                "versioned-gcm",
                "fernet",
                "tink-gcm",
                "raw-gcm",
                "versioned-gcm",
                "fernet",
                "tink-gcm",
                "raw-gcm",
                "aes-gcm",
            ]),
            maybe(text(&[
                "raw", "base64", "raw", "base64", "raw", "base64", "hex",
            ])),
            maybe(text(&[
                "versioned-gcm",
                "fernet",
                "versioned-gcm",
                "fernet",
                "rot13",
            ])),
        ),
        (
            maybe(keys()),
            maybe((maybe(text(&["ctx"])), maybe(text(&["id"])))),
            maybe(condition()),
            rarely(Just(toml::Value::Integer(5))),
        ),
    )
        .prop_map(
            |(
                (table, schema, key, columns),
                (format, encoding, to_format),
                (keys, aad, filter, junk),
            )| {
                let mut t = toml::Table::new();
                t.insert("table".into(), table);
                t.insert("columns".into(), columns);
                t.insert("format".into(), format);
                let aad = aad.map(|(constant, column)| {
                    let mut a = toml::Table::new();
                    a.extend(constant.map(|c| ("constant".to_string(), c)));
                    a.extend(column.map(|c| ("column".to_string(), c)));
                    toml::Value::Table(a)
                });
                for (name, value) in [
                    ("schema", schema),
                    ("primary_key", key),
                    ("encoding", encoding),
                    ("to_format", to_format),
                    ("keys", keys),
                    ("aad", aad),
                    ("where", filter),
                    ("batch", junk),
                ] {
                    t.extend(value.map(|v| (name.to_string(), v)));
                }
                toml::Value::Table(t)
            },
        )
}

/// A job-file-shaped document: valid TOML, fields that may be wrong.
fn document() -> impl Strategy<Value = String> {
    (
        maybe(text(&["nightly"])),
        maybe(keys()),
        proptest::collection::vec(target(), 1..3),
        maybe(text(&["postgres://localhost/db"])),
    )
        .prop_map(|(name, keys, targets, url)| {
            let mut doc = toml::Table::new();
            doc.extend(name.map(|n| ("name".to_string(), n)));
            doc.extend(keys.map(|k| ("keys".to_string(), k)));
            if let Some(url) = url {
                doc.insert(
                    "database".into(),
                    toml::Value::Table(toml::Table::from_iter([("url".to_string(), url)])),
                );
            }
            if !targets.is_empty() {
                doc.insert("target".into(), toml::Value::Array(targets));
            }
            toml::to_string(&doc).unwrap_or_default()
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn arbitrary_text_is_a_checked_job_or_a_configuration_error_that_says_something(text in "\\PC{0,300}") {
        match JobSpec::parse(&text) {
            Ok(spec) => prop_assert!(!spec.targets.is_empty() && spec.targets.iter().all(|t| !t.columns.is_empty())),
            Err(Error::Config(msg)) => prop_assert!(!msg.trim().is_empty()),
            Err(other) => prop_assert!(false, "not a configuration error: {:?}", other),
        }
    }

    #[test]
    fn a_job_shaped_document_is_a_checked_job_or_a_configuration_error(doc in document()) {
        match JobSpec::parse(&doc) {
            Err(Error::Config(msg)) => prop_assert!(!msg.is_empty()),
            Err(other) => prop_assert!(false, "not a configuration error: {:?}", other),
            Ok(spec) => {
                prop_assert!(!spec.targets.is_empty());
                let mut seen = HashSet::new();
                for t in &spec.targets {
                    prop_assert!(!t.table.trim().is_empty() && !t.columns.is_empty());
                    prop_assert!(t.keys.is_some() || spec.keys.is_some());
                    prop_assert!(t.filter.as_deref().map_or(Ok(()), check_condition).is_ok());
                    for c in &t.columns {
                        prop_assert!(seen.insert((t.split_table(), c)), "{:?} twice", c);
                        prop_assert!(!t.primary_key.iter().flatten().any(|k| k == c));
                    }
                }
                // What parses, written back, parses to the same job.
                let again = JobSpec::parse(&toml::to_string(&spec).unwrap()).unwrap();
                prop_assert_eq!(again.spec_hash(), spec.spec_hash());
            }
        }
    }
}

#[test]
fn debug_never_shows_the_database_url_which_may_carry_a_password() {
    let spec = DatabaseSpec {
        url: Some("postgres://app:hunter2@db/prod".into()),
    };
    let shown = format!("{spec:?}");
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(shown.contains("<redacted>"), "{shown}");
}
