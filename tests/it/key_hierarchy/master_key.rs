//! A job naming a master key that does not wrap its key table's data keys
//! (a typo, another environment's key): a configuration error naming the
//! key, KMS's answer and the fix, never the SDK's debug dump.

use super::*;

// Before: exit 1 ("runtime failure") and a 2 KB `Error { code:
// "AccessDeniedException", ... headers ... }`.
#[tokio::test(flavor = "multi_thread")]
async fn a_master_key_that_does_not_wrap_the_keys_is_a_configuration_error_naming_it_and_the_fix() {
    let db = TestDb::new().await;
    let master = master_key(false);
    seed(&db, &master, 1, 5).await;
    let dir = tempfile::tempdir().unwrap();
    let other = master_key(false);
    for wrong in ["alias/nope", other.as_str()] {
        let j = job(&db, &dir, wrong);
        for cmd in [
            vec!["secrets", "show", "--job", &j],
            vec!["plan", "--job", &j],
        ] {
            let out = rekey(&cmd, &aws_env());
            assert_eq!(out.status.code(), Some(2), "{cmd:?}: {}", printed(&out));
            let said = stderr(&out);
            assert!(
                said.contains(wrong)
                    && said.contains("Exception")
                    && said.contains("[keys] kms_key_id")
                    && !said.contains("headers")
                    && !said.contains("Error {")
                    && said.len() < 1_000,
                "{cmd:?}: {}",
                printed(&out)
            );
        }
    }
}
