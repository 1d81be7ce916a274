//! The AWS KMS calls of a key hierarchy, in one place for the stores that
//! keep data keys wrapped by a master key (the key table) and for the master
//! key rewrap: unwrap (Decrypt), generate (GenerateDataKey), re-wrap
//! (ReEncrypt) and check a master key (DescribeKey). Plaintext data keys
//! come back as [`Key`]s, zeroized on drop; errors name keys by id, never
//! by value, and keep only KMS's error code and message (as
//! `aws::errors` does for Secrets Manager): the SDK's own errors print as
//! debug dumps with the response's headers.

use aws_runtime::retries::classifiers::{THROTTLING_ERRORS, TRANSIENT_ERRORS};
use aws_sdk_kms::config::http::HttpResponse;
use aws_sdk_kms::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::{DataKeySpec, KeyState, KeyUsageType};
use aws_sdk_kms::Client;
use zeroize::Zeroizing;

use crate::crypto::keyring::{Key, KeyId, KEY_LEN};
use crate::Error;

/// Why a KMS call of the key hierarchy failed.
#[derive(Debug, thiserror::Error)]
pub enum WrapError {
    /// KMS refused or could not be reached.
    #[error("AWS KMS, {what}: {detail}")]
    Kms {
        /// What rekey asked for.
        what: String,
        /// KMS's answer: its error code and message, or why it was not reached.
        detail: String,
        /// KMS answered with a refusal that will not pass by itself (a key
        /// not found, access denied, another key's blob): a configuration
        /// to fix, not a failure to retry.
        refused: bool,
    },
    /// KMS answered without what the call promises.
    #[error("AWS KMS, {0}: the answer lacks its result")]
    Incomplete(String),
    /// A data key that is not 32 bytes (not an AES-256 key).
    #[error("AWS KMS unwrapped data key {id} to {len} bytes, not 32: it is not an AES-256 key")]
    Length {
        /// The key's id.
        id: KeyId,
        /// Its length.
        len: usize,
    },
    /// A master key that cannot wrap data keys.
    #[error("KMS key {key:?} cannot wrap data keys: {why}")]
    Unusable {
        /// The key as the job or command names it.
        key: String,
        /// Its state or usage.
        why: String,
    },
}

impl WrapError {
    /// Whether KMS refused for a reason the configuration must fix.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            WrapError::Unusable { .. } | WrapError::Kms { refused: true, .. }
        )
    }
}

impl From<WrapError> for Error {
    fn from(e: WrapError) -> Self {
        if e.is_refusal() {
            Error::Config(e.to_string())
        } else {
            Error::Runtime(e.to_string())
        }
    }
}

/// KMS's own error codes that pass by themselves: retrying may succeed.
const KMS_TRANSIENT: &[&str] = &[
    "KMSInternalException",
    "DependencyTimeoutException",
    "LimitExceededException",
];

/// Whether a service error passes by itself (a retry may succeed) rather
/// than a refusal the configuration must fix: KMS's own transient codes,
/// the codes the AWS SDK itself retries as throttling or transient
/// (`ThrottlingException`, `RequestTimeout`, ...), and any answer with a
/// server-side status (5xx: `InternalFailure`, `ServiceUnavailable`).
fn passes_by_itself(code: &str, status: Option<u16>) -> bool {
    KMS_TRANSIENT.contains(&code)
        || THROTTLING_ERRORS.contains(&code)
        || TRANSIENT_ERRORS.contains(&code)
        || status.is_some_and(|s| (500..600).contains(&s))
}

/// A KMS SDK error as one line: the service's code and message, or the
/// innermost cause where KMS was not reached; never the SDK's debug dump.
pub fn kms_failure<E>(what: String, e: SdkError<E, HttpResponse>) -> WrapError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    match &e {
        SdkError::ServiceError(service) => {
            let code = e.code().unwrap_or("an error without a code");
            let status = service.raw().status().as_u16();
            WrapError::Kms {
                what,
                detail: match e.message() {
                    Some(m) => format!("{code}: {m}"),
                    None => code.to_string(),
                },
                refused: !passes_by_itself(code, Some(status)),
            }
        }
        _ => WrapError::Kms {
            what,
            detail: format!(
                "not reached: {} (check region, endpoint, network and credentials)",
                crate::secrets::aws::errors::root_cause(&e)
            ),
            refused: false,
        },
    }
}

/// [`kms_failure`] as one of rekey's errors, for the KMS keyring file.
pub fn kms_error<E>(what: &str, e: SdkError<E, HttpResponse>) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    kms_failure(what.to_string(), e).into()
}

/// 32 plaintext bytes from KMS as a key. Takes KMS's answer's plaintext
/// out of it (`plaintext.take()`), so the buffer the answer held is the one
/// wiped after the copy into the key, not dropped unwiped.
fn as_key(id: KeyId, plain: Option<Blob>) -> Result<Key, WrapError> {
    let plain = Zeroizing::new(plain.map(Blob::into_inner).unwrap_or_default());
    if plain.len() != KEY_LEN {
        return Err(WrapError::Length {
            id,
            len: plain.len(),
        });
    }
    let mut material = Zeroizing::new([0u8; KEY_LEN]);
    material.copy_from_slice(&plain);
    Ok(Key::new(id, *material))
}

/// Unwraps data key `id`; with `pinned`, only under that master key (KMS
/// refuses a blob wrapped under another). Returns the key and the ARN of
/// the master key it was wrapped under.
pub async fn unwrap(
    client: &Client,
    id: KeyId,
    blob: &[u8],
    pinned: Option<&str>,
) -> Result<(Key, String), WrapError> {
    let mut out = client
        .decrypt()
        .ciphertext_blob(Blob::new(blob.to_vec()))
        .set_key_id(pinned.map(str::to_string))
        .send()
        .await
        .map_err(|e| kms_failure(format!("unwrapping data key {id}"), e))?;
    let arn = out.key_id().unwrap_or_default().to_string();
    Ok((as_key(id, out.plaintext.take())?, arn))
}

/// A new AES-256 data key from KMS (GenerateDataKey), and its wrapped form.
pub async fn generate(
    client: &Client,
    id: KeyId,
    master: &str,
) -> Result<(Key, Vec<u8>), WrapError> {
    let what = || format!("generating data key {id} under {master:?}");
    let mut out = client
        .generate_data_key()
        .key_id(master)
        .key_spec(DataKeySpec::Aes256)
        .send()
        .await
        .map_err(|e| kms_failure(what(), e))?;
    let blob = out
        .ciphertext_blob()
        .ok_or_else(|| WrapError::Incomplete(what()))?
        .as_ref()
        .to_vec();
    Ok((as_key(id, out.plaintext.take())?, blob))
}

/// Data key `id` re-wrapped under master key `to` inside KMS (ReEncrypt:
/// the plaintext never leaves KMS).
pub async fn rewrap(
    client: &Client,
    id: KeyId,
    blob: &[u8],
    to: &str,
) -> Result<Vec<u8>, WrapError> {
    let what = || format!("re-wrapping data key {id} under {to:?}");
    let out = client
        .re_encrypt()
        .ciphertext_blob(Blob::new(blob.to_vec()))
        .destination_key_id(to)
        .send()
        .await
        .map_err(|e| kms_failure(what(), e))?;
    Ok(out
        .ciphertext_blob()
        .ok_or_else(|| WrapError::Incomplete(what()))?
        .as_ref()
        .to_vec())
}

/// The ARN of master key `key` (an id, ARN or alias), refused unless it is
/// enabled and made for encryption: the key new data keys are wrapped under.
pub async fn usable_master(client: &Client, key: &str) -> Result<String, WrapError> {
    let unusable = |why: String| WrapError::Unusable {
        key: key.to_string(),
        why,
    };
    let out = client.describe_key().key_id(key).send().await.map_err(|e| {
        match kms_failure(format!("describing master key {key:?}"), e) {
            refused @ WrapError::Kms { refused: true, .. } => unusable(format!(
                "{refused} (check the id or alias, the region and endpoint, and that this identity may call kms:DescribeKey on it)"
            )),
            passing => passing,
        }
    })?;
    let meta = out
        .key_metadata()
        .ok_or_else(|| WrapError::Incomplete(format!("describing {key:?}")))?;
    if meta.key_state() != Some(&KeyState::Enabled) {
        return Err(unusable(format!(
            "its state is {}; enable it (aws kms enable-key, or cancel its deletion) and run again",
            meta.key_state().map_or("unknown", |s| s.as_str())
        )));
    }
    if meta.key_usage() != Some(&KeyUsageType::EncryptDecrypt) {
        return Err(unusable(
            "it is not a symmetric ENCRYPT_DECRYPT key; name one that is".into(),
        ));
    }
    Ok(meta.arn().unwrap_or(key).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttling_timeouts_and_server_errors_pass_by_themselves_and_refusals_do_not() {
        for code in [
            "ThrottlingException",
            "KMSInternalException",
            "DependencyTimeoutException",
            "RequestTimeout",
            "TooManyRequestsException",
        ] {
            assert!(passes_by_itself(code, Some(400)), "{code}");
        }
        for code in ["InternalFailure", "ServiceUnavailable", "AnythingElse"] {
            assert!(passes_by_itself(code, Some(503)), "{code}");
            assert!(passes_by_itself(code, Some(500)), "{code}");
        }
        for code in [
            "AccessDeniedException",
            "NotFoundException",
            "IncorrectKeyException",
            "InvalidCiphertextException",
            "DisabledException",
        ] {
            assert!(!passes_by_itself(code, Some(400)), "{code}");
            assert!(!passes_by_itself(code, None), "{code}");
        }
    }

    #[test]
    fn kms_plaintext_is_taken_by_value_and_must_be_32_bytes() {
        // by value: the Blob's own buffer is the one wiped, not a copy of it
        let key = as_key(7, Some(Blob::new(vec![9u8; KEY_LEN]))).unwrap();
        assert_eq!((key.id(), key.material()), (7, &[9u8; KEY_LEN]));
        for (plain, len) in [(Some(Blob::new(vec![1u8; 31])), 31), (None, 0)] {
            let e = as_key(7, plain).unwrap_err();
            assert!(
                matches!(e, WrapError::Length { id: 7, len: l } if l == len),
                "{e}"
            );
        }
    }
}
