//! The stores on AWS shared by jobs in two databases, against moto's server
//! on loopback: a Secrets Manager keyring secret, and a keyring file whose
//! keys KMS wraps. As with a keyring file (`store_uses`), a retire in one
//! database cannot read the other's tables, so each store records the
//! databases whose values its keys encrypt, and a retire refuses a key
//! another database's record names.
#![cfg(feature = "aws")]

use crate::aws::{boto3, kms_master_key};
use crate::harness::*;

/// Which AWS store the two databases share.
#[derive(Clone, Copy)]
enum Shared {
    /// A Secrets Manager secret holding rekey's keyring.
    Secret,
    /// A keyring file of KMS-wrapped keys.
    KmsFile,
}

/// Two databases seeded with patients under key 1 of one store, and a job
/// file for each (job "patients" on the first, job "b" on the second).
struct TwoDatabases {
    a: TestDb,
    b: TestDb,
    dir: tempfile::TempDir,
    job_a: String,
    job_b: String,
    /// The secret's name, or the KMS keyring file's path.
    store: String,
}

async fn two_databases_before_any_run(shared: Shared, rows: i64) -> TwoDatabases {
    let (a, b) = (TestDb::new().await, TestDb::new().await);
    a.seed_patients(rows).await;
    b.seed_patients(rows).await;
    let dir = tempfile::tempdir().unwrap();
    let (store, keys) = match shared {
        Shared::Secret => {
            let secret = format!(
                "rekey-test/shared-{}-{}",
                std::process::id(),
                a.url.len() + rows as usize + unique()
            );
            let keys = format!("source = \"aws-secrets-manager\"\nsecret_id = \"{secret}\"\n");
            (secret, keys)
        }
        Shared::KmsFile => {
            let path = dir.path().join("keyring.kms.json").display().to_string();
            let keys = format!(
                "source = \"aws-kms\"\nkms_key_id = \"{}\"\npath = {path:?}\n",
                kms_master_key()
            );
            (path, keys)
        }
    };
    let job = |name: &str, db: &TestDb| {
        let at = dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &at,
            format!(
                "name = \"{name}\"\n[database]\nurl = \"{}\"\n[keys]\n{keys}endpoint = \"{}\"\nregion = \"us-east-1\"\n[[target]]\ntable = \"patient_persons\"\ncolumns = [\"phone_encrypted\", \"emergency_contact_phone_encrypted\"]\nformat = \"versioned-gcm\"\n",
                db.url,
                moto().endpoint
            ),
        )
        .unwrap();
        at.display().to_string()
    };
    let (job_a, job_b) = (job("patients", &a), job("b", &b));
    let mut env = aws_env();
    env.push(("ENCRYPTION_KEY_V1", K1.into()));
    env.push(("ENCRYPTION_CURRENT_VERSION", "1".into()));
    let out = rekey(
        &[
            "secrets",
            "init",
            "--job",
            &job_a,
            "--import-env",
            "ENCRYPTION",
        ],
        &env,
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    TwoDatabases {
        a,
        b,
        dir,
        job_a,
        job_b,
        store,
    }
}

/// A number no other call in this process returns.
fn unique() -> usize {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// [`two_databases_before_any_run`], then job b's run: its values are on
/// key 1, and the store records it.
async fn two_databases_sharing(shared: Shared, rows: i64) -> TwoDatabases {
    let t = two_databases_before_any_run(shared, rows).await;
    let out = rekey(&["run", "--job", &t.job_b], &aws_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    t
}

/// `secrets show --json` of `job`.
fn show(job: &str) -> serde_json::Value {
    let out = rekey(&["secrets", "show", "--job", job, "--json"], &aws_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    json(&out)
}

/// Key 1's state, as `secrets show` lists it.
fn key_1_state(job: &str) -> String {
    let show = show(job);
    show["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == 1)
        .unwrap_or_else(|| panic!("{show}"))["state"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Values of job `job`'s tables no key of its store opens, by a full verify.
fn undecryptable(job: &str) -> u64 {
    let out = rekey(&["verify", "--job", job, "--full", "--json"], &aws_env());
    assert!(
        matches!(out.status.code(), Some(0 | 4)),
        "{}",
        printed(&out)
    );
    json(&out)["values_undecryptable"].as_u64().unwrap()
}

/// Before the record: job a's compromise rotation destroyed key 1 (exit 0)
/// while database b's values were all under it.
async fn a_retire_is_refused_while_the_other_database_needs_the_key(shared: Shared) {
    let t = two_databases_sharing(shared, 60).await;
    let b_name: String =
        t.b.client
            .query_one("SELECT current_database()", &[])
            .await
            .unwrap()
            .get(0);
    let out = compromise_rotation(&t.job_a, &aws_env());
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    assert!(
        printed(&out).contains("may still encrypt values in another database")
            && printed(&out).contains(&format!("job \"b\" in database {b_name}"))
            && printed(&out).contains("Nothing was retired"),
        "{}",
        printed(&out)
    );
    assert_eq!(key_1_state(&t.job_a), "previous");
    assert_eq!(undecryptable(&t.job_b), 0);

    // `secrets show` names database b; once forgotten, the retire goes on
    let uses = show(&t.job_a)["uses"].clone();
    assert_eq!(uses.as_array().map(Vec::len), Some(2), "{uses}");
    let b = uses
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["job"] == "b")
        .unwrap_or_else(|| panic!("{uses}"));
    assert_eq!(b["keys"], serde_json::json!([1]), "{uses}");
    let b_id = b["database_id"].as_str().unwrap().to_string();
    let out = rekey(
        &["secrets", "forget", "--job", &t.job_a, "--database", &b_id],
        &aws_env(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert!(audit_events(&t.dir)
        .iter()
        .any(|e| e["event_type"] == "store_use_forgotten"));
    assert!(
        !show(&t.job_a)["uses"]
            .as_array()
            .unwrap()
            .iter()
            .any(|u| u["job"] == "b"),
        "forgotten"
    );
    let out = compromise_rotation(&t.job_a, &aws_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(key_1_state(&t.job_a), "retired");
    drop(t.a);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_secrets_manager_keyring_shared_by_two_databases_keeps_a_key_the_other_one_needs() {
    a_retire_is_refused_while_the_other_database_needs_the_key(Shared::Secret).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kms_keyring_file_shared_by_two_databases_keeps_a_key_the_other_one_needs() {
    a_retire_is_refused_while_the_other_database_needs_the_key(Shared::KmsFile).await;
}

/// The record's secret beside the keyring secret `secret`.
fn uses_secret(secret: &str) -> String {
    format!("{secret}.rekey-uses")
}

/// Stages key 2 from job a (job b's run would move its values to it) and
/// returns the checksum of database b's table.
async fn key_2_staged(t: &TwoDatabases) -> String {
    let out = rekey(&["secrets", "stage", "--job", &t.job_a], &aws_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    t.b.checksum("patient_persons").await
}

// Without the record written before the first write, a run went on where
// the record could not be written, and a retire from the other database
// knew nothing of the values it moved.
#[tokio::test(flavor = "multi_thread")]
async fn a_run_that_cannot_write_the_secret_s_record_stops_before_its_first_write() {
    let t = two_databases_before_any_run(Shared::Secret, 200).await;
    let before = key_2_staged(&t).await;
    record_unwritable(&t);
    let out = rekey(&["run", "--job", &t.job_b], &aws_env());
    assert_eq!(out.status.code(), Some(1), "{}", printed(&out));
    assert_the_record_could_not_be_written(&t, &printed(&out));
    assert_eq!(t.b.checksum("patient_persons").await, before);
}

/// Makes the record of `t`'s secret one rekey can neither read nor write:
/// its secret is there, scheduled for deletion.
fn record_unwritable(t: &TwoDatabases) {
    boto3(
        r#"
import boto3, sys
c = boto3.client("secretsmanager", endpoint_url=sys.argv[1], region_name="us-east-1")
c.create_secret(Name=sys.argv[2], SecretString='{"format":"rekey-keyring-uses/1","uses":[]}')
c.delete_secret(SecretId=sys.argv[2], RecoveryWindowInDays=7)
"#,
        &[&uses_secret(&t.store)],
    );
}

/// Asserts that rekey said it could not write the record, naming the
/// secret and the permissions, and wrote nothing.
fn assert_the_record_could_not_be_written(t: &TwoDatabases, said: &str) {
    assert!(
        said.contains(&format!(
            "could not record in aws-secrets-manager:{}",
            t.store
        )) && said.contains(&format!("the secret {}", uses_secret(&t.store)))
            && said.contains("secretsmanager:PutSecretValue")
            && said.contains("Nothing was written"),
        "{said}"
    );
}

// Found in review: the first `rotate` run by a caller without the record's
// permissions (just after an upgrade) staged key 2 in the keyring secret
// before its run failed on the record.
#[tokio::test(flavor = "multi_thread")]
async fn a_rotate_that_cannot_write_the_secret_s_record_stops_before_it_stages_a_key() {
    let t = two_databases_before_any_run(Shared::Secret, 200).await;
    let before = t.b.checksum("patient_persons").await;
    record_unwritable(&t);
    let out = rekey(&["rotate", "--job", &t.job_b, "--no-wait"], &aws_env());
    assert_eq!(out.status.code(), Some(1), "{}", printed(&out));
    assert_the_record_could_not_be_written(&t, &printed(&out));
    let labels = boto3(
        r#"
import boto3, sys
c = boto3.client("secretsmanager", endpoint_url=sys.argv[1], region_name="us-east-1")
vs = c.list_secret_version_ids(SecretId=sys.argv[2])["Versions"]
print(sorted(s for v in vs for s in v.get("VersionStages", [])))
"#,
        &[&t.store],
    );
    assert_eq!(labels.trim(), "['AWSCURRENT']", "nothing staged");
    assert_eq!(t.b.checksum("patient_persons").await, before);
}

/// Writes `text` as the record of the store `t` shares.
fn damage_the_record(shared: Shared, t: &TwoDatabases, text: &str) {
    match shared {
        Shared::Secret => {
            boto3(
                r#"
import boto3, sys
c = boto3.client("secretsmanager", endpoint_url=sys.argv[1], region_name="us-east-1")
c.put_secret_value(SecretId=sys.argv[2], SecretString=sys.argv[3])
"#,
                &[&uses_secret(&t.store), text],
            );
        }
        Shared::KmsFile => {
            std::fs::write(format!("{}.uses", t.store), text).unwrap();
        }
    }
}

/// A record that does not read (a hand edit, a truncated write) is its
/// own error: taken for no record, a retire would destroy a key another
/// database's values are under.
async fn a_damaged_record_stops_runs_and_retires(shared: Shared) {
    let t = two_databases_sharing(shared, 100).await;
    let before = key_2_staged(&t).await;
    damage_the_record(
        shared,
        &t,
        "{\"format\":\"rekey-keyring-uses/1\",\"uses\":[",
    );
    let out = rekey(&["run", "--job", &t.job_b], &aws_env());
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    assert!(
        printed(&out).contains("is damaged") && printed(&out).contains("truncated"),
        "{}",
        printed(&out)
    );
    assert_eq!(t.b.checksum("patient_persons").await, before);
    let out = rekey(&["secrets", "show", "--job", &t.job_a], &aws_env());
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    let out = compromise_rotation(&t.job_a, &aws_env());
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    assert!(printed(&out).contains("is damaged"), "{}", printed(&out));
    // (a verify reads no record) key 1 still opens database b's values
    assert_eq!(undecryptable(&t.job_b), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_damaged_record_of_a_secrets_manager_keyring_stops_runs_and_retires() {
    a_damaged_record_stops_runs_and_retires(Shared::Secret).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_damaged_record_of_a_kms_keyring_file_stops_runs_and_retires() {
    a_damaged_record_stops_runs_and_retires(Shared::KmsFile).await;
}

// Databases' runs starting at once each read the record and write it back:
// without the label moved only from the version read, the later write
// replaced the earlier one, and a retire no longer knew of that database.
#[tokio::test(flavor = "multi_thread")]
async fn updates_of_a_secret_s_record_at_once_each_keep_the_others() {
    use rekey::secrets::uses::{widen, User};
    let t = two_databases_before_any_run(Shared::Secret, 1).await;
    let keys: rekey::secrets::KeysSpec = toml::from_str(&format!(
        "source = \"aws-secrets-manager\"\nsecret_id = \"{}\"\nendpoint = \"{}\"\nregion = \"us-east-1\"\n",
        t.store,
        moto().endpoint
    ))
    .unwrap();
    // the credentials the SDK reads, as every test sets them
    for (k, v) in aws_env() {
        std::env::set_var(k, v);
    }
    let writers: Vec<_> = (0..5)
        .map(|i| {
            let keys = keys.clone();
            tokio::spawn(async move {
                let mut store = rekey::secrets::Store::open(&keys).await.unwrap();
                let user = User {
                    database_id: format!("db{i}"),
                    database: format!("db{i} on a server"),
                    job: "j".into(),
                };
                store
                    .update_uses(|records| widen(records, &user, &[1], 1))
                    .await
                    .unwrap()
            })
        })
        .collect();
    for w in writers {
        assert_eq!(w.await.unwrap(), Some(true));
    }
    let mut ids: Vec<String> = show(&t.job_a)["uses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["database_id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    assert_eq!(ids, ["db0", "db1", "db2", "db3", "db4"]);
}

// Found in review: a job reading a replica of the keyring secret (in another
// region) kept its record beside the replica, a second record a retire in
// the primary region never read; that retire's new version replicated to the
// databases reading the replica.
#[tokio::test(flavor = "multi_thread")]
async fn a_keyring_secret_read_in_a_replica_region_is_refused_naming_the_primary() {
    let t = two_databases_before_any_run(Shared::Secret, 50).await;
    boto3(
        r#"
import boto3, sys
c = boto3.client("secretsmanager", endpoint_url=sys.argv[1], region_name="us-east-1")
c.replicate_secret_to_regions(SecretId=sys.argv[2], AddReplicaRegions=[{"Region": "eu-west-1"}])
"#,
        &[&t.store],
    );
    let job = std::fs::read_to_string(&t.job_b)
        .unwrap()
        .replace("region = \"us-east-1\"", "region = \"eu-west-1\"");
    std::fs::write(&t.job_b, job).unwrap();
    let before = t.b.checksum("patient_persons").await;
    let out = rekey(&["run", "--job", &t.job_b], &aws_env());
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    assert!(
        printed(&out).contains("where it is a replica of the secret in us-east-1")
            && printed(&out).contains("region = \"us-east-1\""),
        "{}",
        printed(&out)
    );
    assert_eq!(t.b.checksum("patient_persons").await, before);
    // read in its primary region, the same job runs
    let job = std::fs::read_to_string(&t.job_b)
        .unwrap()
        .replace("region = \"eu-west-1\"", "region = \"us-east-1\"");
    std::fs::write(&t.job_b, job).unwrap();
    let out = rekey(&["run", "--job", &t.job_b], &aws_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
}

// Found in review: a record secret with no version labelled AWSCURRENT read
// as "no record yet" (Secrets Manager answers "not found" for the label), so
// a retire from the other database went on, and a run retried creating it
// eight times, then blamed other databases' updates.
#[tokio::test(flavor = "multi_thread")]
async fn a_record_secret_with_no_current_version_is_damaged_not_missing() {
    let t = two_databases_sharing(Shared::Secret, 50).await;
    boto3(
        r#"
import boto3, sys
c = boto3.client("secretsmanager", endpoint_url=sys.argv[1], region_name="us-east-1")
current = [v["VersionId"] for v in c.list_secret_version_ids(SecretId=sys.argv[2])["Versions"] if "AWSCURRENT" in v["VersionStages"]][0]
c.update_secret_version_stage(SecretId=sys.argv[2], VersionStage="AWSCURRENT", RemoveFromVersionId=current)
"#,
        &[&uses_secret(&t.store)],
    );
    let out = compromise_rotation(&t.job_a, &aws_env());
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    assert!(
        printed(&out).contains("is damaged: no version of it is labelled AWSCURRENT"),
        "{}",
        printed(&out)
    );
    assert_eq!(undecryptable(&t.job_b), 0);
}
