//! Bad input: hostile identifiers cannot inject SQL, where conditions cannot
//! escape their parentheses, and awkward table shapes each get a clear
//! result (done, or refused with exit 2, a message naming the problem and
//! the fix, and no row touched).

use base64::Engine as _;
use rekey::crypto::codec::versioned_gcm::VersionedGcm;
use rekey::crypto::codec::Codec;

use crate::harness::*;

/// `name` as a quoted SQL identifier, for the test's own DDL.
fn q(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `text` as a TOML basic string (JSON's escapes are TOML's).
fn toml_str(text: &str) -> String {
    serde_json::to_string(text).unwrap()
}

/// A job file with env keys and the given `[[target]]` sections.
fn write_job(dir: &tempfile::TempDir, db: &TestDb, targets: &str) -> String {
    write_job_with(dir, db, "", targets)
}

/// As [`write_job`], with `top` (top-level fields such as `name`) first.
fn write_job_with(dir: &tempfile::TempDir, db: &TestDb, top: &str, targets: &str) -> String {
    let path = dir.path().join("job.toml");
    std::fs::write(
        &path,
        format!(
            "{top}[database]\nurl = \"{}\"\n[keys]\nsource = \"env\"\n{targets}",
            db.url
        ),
    )
    .unwrap();
    path.display().to_string()
}

/// One `[[target]]` over table `t`'s column `c` (primary key from the table).
fn target_t(extra: &str) -> String {
    format!("[[target]]\ntable = \"t\"\ncolumns = [\"c\"]\nformat = \"versioned-gcm\"\n{extra}\n")
}

fn v2() -> VersionedGcm {
    VersionedGcm::new(&v2_ring()).unwrap()
}

fn seal_v1(plaintext: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    v1_codec().seal(plaintext, b"", None, &mut out);
    out
}

fn b64(v: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(v)
}

/// A table the job never names, which an injection would drop or empty.
async fn plant_canary(db: &TestDb) {
    db.client
        .batch_execute("CREATE TABLE canary (x int); INSERT INTO canary VALUES (42)")
        .await
        .unwrap();
}

async fn assert_canary_alive(db: &TestDb) {
    let x: i32 = db
        .client
        .query_one("SELECT x FROM canary", &[])
        .await
        .expect("the canary table is gone")
        .get(0);
    assert_eq!(x, 42);
}

/// Runs `args`, expects exit 2 with every needle in stderr, and no change to `table`.
async fn assert_refused(db: &TestDb, table: &str, args: &[&str], needles: &[&str]) {
    let before = db.checksum(table).await;
    let out = rekey(args, &seed_env());
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    let said = String::from_utf8_lossy(&out.stderr);
    for needle in needles {
        assert!(said.contains(needle), "expected {needle:?} in: {said}");
    }
    assert_eq!(
        db.checksum(table).await,
        before,
        "a refused job changed {table}"
    );
}

/// Rows in `rekey.quarantine`, 0 when the engine schema does not exist.
async fn quarantined(db: &TestDb) -> i64 {
    db.client
        .query_one("SELECT CASE WHEN to_regclass('rekey.quarantine') IS NULL THEN 0 ELSE (SELECT count(*) FROM rekey.quarantine) END", &[])
        .await
        .unwrap()
        .get(0)
}

const SCHEMA: &str = "Sch\"e'ma; --\\ Ü";
const TABLE: &str = "Pa\"tients; DROP TABLE canary; --";
const KEY: &str = "I\"d'); DROP TABLE canary; --";
const COLUMNS: [&str; 3] = [
    "Ünïcødé 表",
    "x'); DROP TABLE canary; --",
    "UPPER\\Case \"Col\"",
];
const OTHER_TABLE: &str = "Ünïcødé 表";
const DOTTED_COLUMN: &str = "a.b\"c";
const AAD_COLUMN: &str = "no'te\"; --";
const JOB_NAME: &str = "j'ob\"; DROP TABLE canary; --";

#[tokio::test(flavor = "multi_thread")]
async fn tables_and_columns_named_with_quotes_semicolons_and_unicode_rotate_and_drop_nothing() {
    let db = TestDb::new().await;
    plant_canary(&db).await;
    let (s, t, k) = (q(SCHEMA), q(TABLE), q(KEY));
    let [c1, c2, c3] = COLUMNS.map(q);
    db.client
        .batch_execute(&format!(
            "CREATE SCHEMA {s};
             CREATE TABLE {s}.{t} ({k} bigint PRIMARY KEY, {c1} bytea, {c2} text, {c3} bytea);
             CREATE TABLE {s}.{o} (id int PRIMARY KEY, {d} bytea, {n} text);",
            o = q(OTHER_TABLE),
            d = q(DOTTED_COLUMN),
            n = q(AAD_COLUMN)
        ))
        .await
        .unwrap();
    for id in 0..200i64 {
        let sealed = |col: usize| seal_v1(format!("{col}/{id}").as_bytes());
        db.client
            .execute(
                &format!("INSERT INTO {s}.{t} VALUES ($1, $2, $3, $4)"),
                &[&id, &sealed(0), &b64(&sealed(1)), &sealed(2)],
            )
            .await
            .unwrap();
        let note = format!("n'{id}\"");
        let mut bound = Vec::new();
        v1_codec().seal(b"bound", note.as_bytes(), None, &mut bound);
        db.client
            .execute(
                &format!(
                    "INSERT INTO {s}.{o} VALUES ($1, $2, $3)",
                    o = q(OTHER_TABLE)
                ),
                &[&(id as i32), &bound, &note],
            )
            .await
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let columns = COLUMNS.map(toml_str).join(", ");
    // A hostile job name; one target with `schema`, an explicit key and a
    // where naming the hostile key column; one as "schema.table" with a
    // dotted column whose values bind another hostile column as associated data.
    let job = write_job_with(
        &dir,
        &db,
        &format!("name = {}\n", toml_str(JOB_NAME)),
        &format!(
            "[[target]]\nschema = {}\ntable = {}\nprimary_key = [{}]\ncolumns = [{columns}]\nformat = \"versioned-gcm\"\nwhere = {}\n\
             [[target]]\ntable = {}\ncolumns = [{}]\nformat = \"versioned-gcm\"\naad = {{ column = {} }}\n",
            toml_str(SCHEMA),
            toml_str(TABLE),
            toml_str(KEY),
            toml_str(&format!("{k} >= 0")),
            toml_str(&format!("{SCHEMA}.{OTHER_TABLE}")),
            toml_str(DOTTED_COLUMN),
            toml_str(AAD_COLUMN),
        ),
    );

    let plan = rekey(&["plan", "--job", &job, "--json"], &seed_env());
    assert_eq!(plan.status.code(), Some(0), "{}", printed(&plan));
    assert_eq!(json(&plan)["values_to_rewrite"], 800);
    let run = rekey(
        &["run", "--job", &job, "--json", "--batch-size", "64"],
        &seed_env(),
    );
    assert_eq!(run.status.code(), Some(0), "{}", printed(&run));
    assert_eq!(json(&run)["values_rewritten"], 800);
    let verify = rekey(&["verify", "--job", &job, "--full", "--json"], &seed_env());
    assert_eq!(verify.status.code(), Some(0), "{}", printed(&verify));
    assert_eq!(
        (
            json(&verify)["values_on_target_key"].as_u64(),
            json(&verify)["values_on_old_keys"].as_u64()
        ),
        (Some(800), Some(0))
    );

    for r in db
        .client
        .query(&format!("SELECT {k}, {c1}, {c2}, {c3} FROM {s}.{t}"), &[])
        .await
        .unwrap()
    {
        let id: i64 = r.get(0);
        let b64_col = base64::engine::general_purpose::STANDARD
            .decode(r.get::<_, String>(2))
            .unwrap();
        for (col, value) in [
            (0, r.get::<_, Vec<u8>>(1)),
            (1, b64_col),
            (2, r.get::<_, Vec<u8>>(3)),
        ] {
            let opened = v2().open(&value, b"").unwrap();
            assert_eq!(
                (opened.key, opened.plaintext.as_slice()),
                (2, format!("{col}/{id}").as_bytes())
            );
        }
    }
    let query = format!(
        "SELECT {d}, {n} FROM {s}.{o}",
        d = q(DOTTED_COLUMN),
        n = q(AAD_COLUMN),
        o = q(OTHER_TABLE)
    );
    for r in db.client.query(&query, &[]).await.unwrap() {
        let (value, note): (Vec<u8>, String) = (r.get(0), r.get(1));
        let opened = v2().open(&value, note.as_bytes()).unwrap();
        assert_eq!(
            (opened.key, opened.plaintext.as_slice()),
            (2, &b"bound"[..])
        );
    }
    assert_canary_alive(&db).await;
    let status = rekey(&["status", "--job", &job, "--json"], &[]);
    assert_eq!(
        (status.status.code(), json(&status)["state"].as_str()),
        (Some(0), Some("done")),
        "{}",
        printed(&status)
    );
    assert_eq!(json(&status)["name"], JOB_NAME);
    let again = rekey(&["run", "--job", &job, "--json"], &seed_env());
    assert_eq!(json(&again)["rows_scanned"], 0, "{}", printed(&again));
}

#[tokio::test(flavor = "multi_thread")]
async fn where_conditions_that_try_to_escape_are_refused_and_change_nothing() {
    let db = TestDb::new().await;
    db.seed_patients(50).await;
    plant_canary(&db).await;
    // With this, PostgreSQL reads a backslash in '...' as an escape.
    let name: String = db
        .client
        .query_one("SELECT current_database()::text", &[])
        .await
        .unwrap()
        .get(0);
    db.client
        .batch_execute(&format!(
            "ALTER DATABASE {name} SET standard_conforming_strings = off"
        ))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (filter, reason) in [
        ("1=1) OR (true", "closes a parenthesis it did not open"),
        ("; DROP TABLE canary", "contains ';'"),
        ("id > 0; DROP TABLE canary", "contains ';'"),
        ("true) OR (true", "closes a parenthesis it did not open"),
        ("id > 0 -- ) OR (true", "contains a comment"),
        ("id::text = E'\\' ) OR (true --'", "escape-string constant"),
        (
            "id::text = '\\'' ) OR (true OR id::text = '\\''",
            "backslash inside a string",
        ),
        ("name = $$x$$) OR (true", "'$'"),
    ] {
        let job = write_job(
            &dir,
            &db,
            &format!("[[target]]\ntable = \"patient_persons\"\ncolumns = [\"phone_encrypted\"]\nformat = \"versioned-gcm\"\nwhere = {}\n", toml_str(filter)),
        );
        for command in ["run", "plan", "verify"] {
            assert_refused(
                &db,
                "patient_persons",
                &[command, "--job", &job],
                &["where", reason],
            )
            .await;
        }
    }
    assert_canary_alive(&db).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_table_without_a_primary_key_is_refused_naming_the_fix() {
    let db = TestDb::new().await;
    db.client
        .batch_execute("CREATE TABLE t (id bigint NOT NULL, c bytea)")
        .await
        .unwrap();
    db.client
        .execute("INSERT INTO t VALUES (1, $1)", &[&seal_v1(b"x")])
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let job = write_job(&dir, &db, &target_t(""));
    assert_refused(
        &db,
        "t",
        &["run", "--job", &job],
        &[
            "public.t has no primary key",
            "add one, or name a unique NOT NULL column set in [[target]] primary_key",
        ],
    )
    .await;
    // A column that is not unique will not do either.
    let job = write_job(&dir, &db, &target_t("primary_key = [\"id\"]"));
    assert_refused(
        &db,
        "t",
        &["run", "--job", &job],
        &["primary_key [id] is not a unique key of public.t (keys: none)"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_unique_not_null_column_named_as_primary_key_stands_in_for_one() {
    let db = TestDb::new().await;
    db.client
        .batch_execute("CREATE TABLE t (code text NOT NULL UNIQUE, maybe int UNIQUE, c bytea)")
        .await
        .unwrap();
    for i in 0..120 {
        db.client
            .execute(
                "INSERT INTO t VALUES ($1, $2, $3)",
                &[
                    &format!("code-{i}"),
                    &i,
                    &seal_v1(format!("v{i}").as_bytes()),
                ],
            )
            .await
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let nullable = write_job(&dir, &db, &target_t("primary_key = [\"maybe\"]"));
    assert_refused(
        &db,
        "t",
        &["run", "--job", &nullable],
        &["primary_key column public.t.maybe allows NULL"],
    )
    .await;

    let job = write_job(&dir, &db, &target_t("primary_key = [\"code\"]"));
    let out = rekey(
        &["run", "--job", &job, "--json", "--batch-size", "50"],
        &seed_env(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(json(&out)["values_rewritten"], 120);
    for r in db.client.query("SELECT code, c FROM t", &[]).await.unwrap() {
        let (code, c): (String, Vec<u8>) = (r.get(0), r.get(1));
        assert_eq!(
            v2().open(&c, b"").unwrap().plaintext.as_slice(),
            format!("v{}", &code[5..]).as_bytes()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_encrypted_column_of_the_wrong_type_is_refused_naming_the_column_its_type_and_what_fits()
{
    let db = TestDb::new().await;
    db.client
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY, c integer, j jsonb, s text)")
        .await
        .unwrap();
    db.client
        .execute(
            "INSERT INTO t VALUES (1, 7, '{}', $1)",
            &[&b64(&seal_v1(b"x"))],
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let job = write_job(&dir, &db, &target_t(""));
    assert_refused(&db, "t", &["run", "--job", &job], &["column public.t.c is integer; encrypted columns must be bytea (raw ciphertext) or text (base64)"]).await;
    let job = write_job(&dir, &db, &target_t("").replace("[\"c\"]", "[\"j\"]"));
    assert_refused(
        &db,
        "t",
        &["run", "--job", &job],
        &["column public.t.j is jsonb; encrypted columns must be bytea"],
    )
    .await;
    // A text column cannot hold the raw bytes of a binary format.
    let job = write_job(
        &dir,
        &db,
        &target_t("encoding = \"raw\"").replace("[\"c\"]", "[\"s\"]"),
    );
    assert_refused(&db, "t", &["run", "--job", &job], &["column public.t.s is text, but versioned-gcm values are binary: set encoding = \"base64\" (or use a bytea column)"]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_targets_naming_the_same_column_are_refused_however_the_table_is_spelled() {
    let db = TestDb::new().await;
    db.client
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY, c bytea, d bytea)")
        .await
        .unwrap();
    db.client
        .execute("INSERT INTO t VALUES (1, $1, $1)", &[&seal_v1(b"x")])
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let same = write_job(&dir, &db, &format!("{}{}", target_t(""), target_t("")));
    assert_refused(
        &db,
        "t",
        &["run", "--job", &same],
        &["column \"c\" is listed twice in this job; each column may appear in one target only"],
    )
    .await;
    let respelled = format!("{}[[target]]\ntable = \"public.t\"\ncolumns = [\"d\", \"c\"]\nformat = \"versioned-gcm\"\n", target_t(""));
    let job = write_job(&dir, &db, &respelled);
    assert_refused(&db, "t", &["run", "--job", &job], &["[[target]] #2 (table \"public.t\"): column public.t.c is also rotated by [[target]] #1; each column may appear in one target only"]).await;
    let with_schema = format!("{}[[target]]\nschema = \"public\"\ntable = \"t\"\ncolumns = [\"c\"]\nformat = \"versioned-gcm\"\n", target_t(""));
    let job = write_job(&dir, &db, &with_schema);
    assert_refused(
        &db,
        "t",
        &["plan", "--job", &job],
        &["is also rotated by [[target]] #1"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_empty_table_rotates_with_nothing_to_do() {
    let db = TestDb::new().await;
    db.client
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY, c bytea)")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let job = write_job(&dir, &db, &target_t(""));
    let plan = rekey(&["plan", "--job", &job, "--json"], &seed_env());
    assert_eq!(
        (
            plan.status.code(),
            json(&plan)["values_to_rewrite"].as_u64()
        ),
        (Some(0), Some(0)),
        "{}",
        printed(&plan)
    );
    // The preflight has no value to try the keys on; that is not a reason to refuse.
    let run = rekey(&["run", "--job", &job, "--json"], &seed_env());
    assert_eq!(run.status.code(), Some(0), "{}", printed(&run));
    assert_eq!(
        (
            json(&run)["rows_scanned"].as_u64(),
            json(&run)["values_rewritten"].as_u64()
        ),
        (Some(0), Some(0))
    );
    let verify = rekey(&["verify", "--job", &job, "--full", "--json"], &seed_env());
    assert_eq!(
        (verify.status.code(), json(&verify)["values_total"].as_u64()),
        (Some(0), Some(0)),
        "{}",
        printed(&verify)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_table_of_one_row_rotates() {
    let db = TestDb::new().await;
    db.client
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY, c bytea)")
        .await
        .unwrap();
    db.client
        .execute("INSERT INTO t VALUES (1, $1)", &[&seal_v1(b"only")])
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let job = write_job(&dir, &db, &target_t(""));
    let run = rekey(&["run", "--job", &job, "--json"], &seed_env());
    assert_eq!(run.status.code(), Some(0), "{}", printed(&run));
    assert_eq!(
        (
            json(&run)["rows_scanned"].as_u64(),
            json(&run)["values_rewritten"].as_u64()
        ),
        (Some(1), Some(1))
    );
    let c: Vec<u8> = db
        .client
        .query_one("SELECT c FROM t", &[])
        .await
        .unwrap()
        .get(0);
    let opened = v2().open(&c, b"").unwrap();
    assert_eq!((opened.key, opened.plaintext.as_slice()), (2, &b"only"[..]));
}

#[tokio::test(flavor = "multi_thread")]
async fn nulls_in_every_encrypted_column_are_counted_and_nothing_is_quarantined() {
    let db = TestDb::new().await;
    db.client.batch_execute("CREATE TABLE t (id int PRIMARY KEY, c bytea, d text); INSERT INTO t SELECT g, NULL, NULL FROM generate_series(1, 150) g").await.unwrap();
    let before = db.checksum("t").await;
    let dir = tempfile::tempdir().unwrap();
    let job = write_job(
        &dir,
        &db,
        &target_t("").replace("[\"c\"]", "[\"c\", \"d\"]"),
    );
    let plan = rekey(&["plan", "--job", &job, "--json"], &seed_env());
    assert_eq!(plan.status.code(), Some(0), "{}", printed(&plan));
    let columns = json(&plan)["columns"].clone();
    assert_eq!(
        (columns[0]["nulls"].as_u64(), columns[1]["nulls"].as_u64()),
        (Some(150), Some(150)),
        "{columns}"
    );
    assert_eq!(json(&plan)["values_to_rewrite"], 0);
    let run = rekey(&["run", "--job", &job, "--json"], &seed_env());
    assert_eq!(run.status.code(), Some(0), "{}", printed(&run));
    let s = json(&run);
    assert_eq!(
        (s["values_rewritten"].as_u64(), s["values_failed"].as_u64()),
        (Some(0), Some(0)),
        "{s}"
    );
    assert_eq!(quarantined(&db).await, 0);
    assert_eq!(db.checksum("t").await, before);
    let verify = rekey(&["verify", "--job", &job, "--full", "--json"], &seed_env());
    assert_eq!(
        (
            verify.status.code(),
            json(&verify)["values_undecryptable"].as_u64()
        ),
        (Some(0), Some(0)),
        "{}",
        printed(&verify)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn one_mebibyte_values_rotate_and_decrypt_back() {
    let db = TestDb::new().await;
    db.client
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY, c bytea, s text)")
        .await
        .unwrap();
    let plaintext = |id: i32| -> Vec<u8> {
        (0..1 << 20)
            .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8 ^ id as u8)
            .collect()
    };
    for id in 1..=3 {
        let pt = plaintext(id);
        db.client
            .execute(
                "INSERT INTO t VALUES ($1, $2, $3)",
                &[&id, &seal_v1(&pt), &b64(&seal_v1(&pt))],
            )
            .await
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let job = write_job(
        &dir,
        &db,
        &target_t("").replace("[\"c\"]", "[\"c\", \"s\"]"),
    );
    let run = rekey(
        &["run", "--job", &job, "--json", "--batch-size", "2"],
        &seed_env(),
    );
    assert_eq!(run.status.code(), Some(0), "{}", printed(&run));
    assert_eq!(json(&run)["values_rewritten"], 6);
    for r in db
        .client
        .query("SELECT id, c, s FROM t", &[])
        .await
        .unwrap()
    {
        let id: i32 = r.get(0);
        let s = base64::engine::general_purpose::STANDARD
            .decode(r.get::<_, String>(2))
            .unwrap();
        for value in [r.get::<_, Vec<u8>>(1), s] {
            let opened = v2().open(&value, b"").unwrap();
            assert_eq!(opened.key, 2);
            assert!(
                opened.plaintext.as_slice() == plaintext(id).as_slice(),
                "row {id} did not decrypt back"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dotted_or_overlong_table_name_is_refused_saying_how_to_name_it() {
    let db = TestDb::new().await;
    let long = "x".repeat(70);
    // PostgreSQL keeps the first 63 bytes of the long name.
    db.client.batch_execute(&format!("CREATE TABLE \"a.b\" (id int PRIMARY KEY, c bytea); CREATE TABLE {} (id int PRIMARY KEY, c bytea)", q(&long))).await.unwrap();
    db.client
        .execute("INSERT INTO \"a.b\" VALUES (1, $1)", &[&seal_v1(b"dotted")])
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let dotted = write_job(&dir, &db, &target_t("").replace("\"t\"", "\"a.b\""));
    assert_refused(
        &db,
        "\"a.b\"",
        &["run", "--job", &dotted],
        &[
            "table \"a.b\" not found in schema \"a\"",
            "needs its schema given apart: schema = \"public\", table = \"a.b\"",
        ],
    )
    .await;
    let job = write_job(
        &dir,
        &db,
        &target_t("schema = \"public\"").replace("\"t\"", "\"a.b\""),
    );
    let out = rekey(&["run", "--job", &job, "--json"], &seed_env());
    assert_eq!(
        (out.status.code(), json(&out)["values_rewritten"].as_u64()),
        (Some(0), Some(1)),
        "{}",
        printed(&out)
    );

    let overlong = write_job(&dir, &db, &target_t("").replace("\"t\"", &toml_str(&long)));
    assert_refused(
        &db,
        &q(&long[..63]),
        &["run", "--job", &overlong],
        &["is 70 bytes, and PostgreSQL keeps only the first 63 bytes of a name"],
    )
    .await;
    let job = write_job(
        &dir,
        &db,
        &target_t("").replace("\"t\"", &toml_str(&long[..63])),
    );
    let out = rekey(&["run", "--job", &job, "--json"], &seed_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
}

#[tokio::test(flavor = "multi_thread")]
async fn associated_data_from_a_column_the_job_rewrites_is_refused() {
    let db = TestDb::new().await;
    db.client
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY, c bytea, d bytea)")
        .await
        .unwrap();
    db.client
        .execute("INSERT INTO t VALUES (1, $1, $1)", &[&seal_v1(b"x")])
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let same = write_job(
        &dir,
        &db,
        &target_t("aad = { column = \"d\" }").replace("[\"c\"]", "[\"c\", \"d\"]"),
    );
    assert_refused(
        &db,
        "t",
        &["run", "--job", &same],
        &["aad column public.t.d is itself re-encrypted by [[target]] #1"],
    )
    .await;
    let other = write_job(
        &dir,
        &db,
        &format!(
            "{}[[target]]\ntable = \"t\"\ncolumns = [\"d\"]\nformat = \"versioned-gcm\"\n",
            target_t("aad = { column = \"d\" }")
        ),
    );
    assert_refused(
        &db,
        "t",
        &["run", "--job", &other],
        &["[[target]] #1: aad column public.t.d is itself re-encrypted by [[target]] #2"],
    )
    .await;
}

/// `standard_conforming_strings = off` (a database or role setting some
/// legacy applications need) must not change what rekey's own SQL means.
#[tokio::test(flavor = "multi_thread")]
async fn a_text_value_that_is_not_base64_is_quarantined_when_the_database_reads_backslashes_as_escapes(
) {
    let db = TestDb::new().await;
    let name: String = db
        .client
        .query_one("SELECT current_database()::text", &[])
        .await
        .unwrap()
        .get(0);
    db.client
        .batch_execute(&format!(
            "ALTER DATABASE {name} SET standard_conforming_strings = off"
        ))
        .await
        .unwrap();
    db.client
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY, s text)")
        .await
        .unwrap();
    for id in 1..=20 {
        db.client
            .execute(
                "INSERT INTO t VALUES ($1, $2)",
                &[&id, &b64(&seal_v1(b"x"))],
            )
            .await
            .unwrap();
    }
    db.client
        .execute("UPDATE t SET s = 'not base64!' WHERE id = 7", &[])
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let job = write_job(&dir, &db, &target_t("").replace("[\"c\"]", "[\"s\"]"));
    // Version 120 is the byte 'x': the one a mis-read '\x' literal makes.
    let k120 = "0b".repeat(32);
    let env = vec![
        ("ENCRYPTION_KEY_V1", K1.to_string()),
        ("ENCRYPTION_KEY_V120", k120),
        ("ENCRYPTION_CURRENT_VERSION", "120".to_string()),
    ];
    let out = rekey(&["run", "--job", &job, "--json"], &env);
    assert_eq!(out.status.code(), Some(3), "{}", printed(&out));
    assert_eq!(
        (
            json(&out)["values_rewritten"].as_u64(),
            json(&out)["values_failed"].as_u64()
        ),
        (Some(19), Some(1))
    );
    assert_eq!(json(&out)["failures"][0]["error"], "bad_encoding");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_view_named_as_the_table_is_refused_saying_what_it_is() {
    let db = TestDb::new().await;
    db.client.batch_execute("CREATE TABLE t (id int PRIMARY KEY, c bytea); CREATE VIEW v AS SELECT * FROM t; CREATE MATERIALIZED VIEW m AS SELECT * FROM t").await.unwrap();
    db.client
        .execute("INSERT INTO t VALUES (1, $1)", &[&seal_v1(b"x")])
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (relation, kind) in [("v", "a view"), ("m", "a materialized view")] {
        let job = write_job(
            &dir,
            &db,
            &target_t("").replace("\"t\"", &format!("\"{relation}\"")),
        );
        let said = format!("\"{relation}\" in the search_path is {kind}, not a table");
        assert_refused(
            &db,
            "t",
            &["run", "--job", &job],
            &[&said, "name the table the values are stored in"],
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_of_unusual_types_page_through_every_row() {
    let db = TestDb::new().await;
    db.client
        .batch_execute(
            "CREATE TABLE t (k bytea, n numeric, ts timestamptz, name text COLLATE \"C\", c bytea, PRIMARY KEY (k, n, ts, name))",
        )
        .await
        .unwrap();
    for i in 0..301i32 {
        db.client
            .execute(
                "INSERT INTO t SELECT decode(md5(i::text), 'hex'), i::numeric / 7, timestamptz '2024-01-01' + i * interval '1 minute', 'Ä' || (i % 3), $2 FROM (SELECT $1::int AS i) s",
                &[&i, &seal_v1(format!("r{i}").as_bytes())],
            )
            .await
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let job = write_job(&dir, &db, &target_t(""));
    let out = rekey(
        &[
            "run",
            "--job",
            &job,
            "--json",
            "--batch-size",
            "16",
            "--workers",
            "3",
        ],
        &seed_env(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(json(&out)["values_rewritten"], 301);
    let verify = rekey(&["verify", "--job", &job, "--full", "--json"], &seed_env());
    assert_eq!(
        (
            verify.status.code(),
            json(&verify)["values_on_target_key"].as_u64()
        ),
        (Some(0), Some(301)),
        "{}",
        printed(&verify)
    );
}

// Today: `plan` showed a text value that is not base64 as "empty (no such
// key)", an empty string under "NULL" unsaid, and an all-NULL column as
// "0 NULL, ; 0 to rewrite".
#[tokio::test(flavor = "multi_thread")]
async fn plan_names_values_that_are_not_base64_and_counts_empty_ones_with_the_nulls() {
    let db = TestDb::new().await;
    db.seed_patients(10).await;
    db.client
        .batch_execute(
            "CREATE TABLE t (id int PRIMARY KEY, c text, d text);
             INSERT INTO t SELECT id, encode(phone_encrypted, 'base64'), NULL FROM patient_persons;
             INSERT INTO t VALUES (1001, '', NULL), (1002, 'not base64 !!', NULL);",
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let job = write_job(
        &dir,
        &db,
        "[[target]]\ntable = \"t\"\nprimary_key = [\"id\"]\ncolumns = [\"c\", \"d\"]\nformat = \"versioned-gcm\"\n",
    );
    let out = rekey(&["plan", "--job", &job], &seed_env());
    let text = printed(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("public.t.c: 12 rows, 1 NULL or empty, not base64=1 v1=10;")
            && !text.contains("empty (no such key)"),
        "{text}"
    );
    assert!(
        text.contains("public.t.d: 12 rows, 12 NULL or empty; 0 to rewrite"),
        "{text}"
    );
}

// Before: a table named without its schema was the first the search_path
// reached; a DBA's scratch copy in the schema named after rekey's role
// ("$user") was rotated in place of public's, and `rotate` retired key 1
// with the applications' table wholly under it.
#[tokio::test(flavor = "multi_thread")]
async fn a_table_named_without_its_schema_that_two_schemas_answer_to_is_refused() {
    let db = TestDb::new().await;
    db.seed_patients(50).await;
    db.client
        .batch_execute(
            "CREATE SCHEMA postgres;
             CREATE TABLE postgres.patient_persons (LIKE public.patient_persons INCLUDING ALL);
             INSERT INTO postgres.patient_persons SELECT * FROM public.patient_persons WHERE id <= 5;",
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir).display().to_string();
    let before = db.checksum("postgres.patient_persons").await;
    for command in [
        vec!["run", "--job", job.as_str()],
        vec!["verify", "--job", job.as_str()],
        vec!["plan", "--job", job.as_str()],
    ] {
        assert_refused(
            &db,
            "public.patient_persons",
            &command,
            &[
                "\"patient_persons\" is found in 2 schemas of rekey's search_path",
                "postgres.patient_persons, public.patient_persons",
                "name the schema in the job file (table = \"postgres.patient_persons\"",
            ],
        )
        .await;
    }
    assert_eq!(db.checksum("postgres.patient_persons").await, before);
    // with the schema named, the run rotates the table named
    std::fs::write(
        &job,
        std::fs::read_to_string(&job)
            .unwrap()
            .replace("\"patient_persons\"", "\"public.patient_persons\""),
    )
    .unwrap();
    let out = rekey(&["run", "--job", &job], &seed_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let on_key_1: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM public.patient_persons WHERE get_byte(phone_encrypted, 0) <> 2",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(on_key_1, 0);
    assert_eq!(db.checksum("postgres.patient_persons").await, before);
}
