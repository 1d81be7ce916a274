//! AWS Secrets Manager failures as one sentence each: the secret, what rekey
//! was doing, and how to fix it. The SDK's own errors print as debug dumps
//! (`ServiceError(ServiceError { source: ResourceExistsException(...`), which
//! tell an operator nothing; only the service's error code and message (a
//! sentence AWS wrote) are kept, never a request body (which may hold a key).

use aws_sdk_secretsmanager::error::{ProvideErrorMetadata, SdkError};

use crate::Error;

/// One call to Secrets Manager, for messages: what rekey was doing and the
/// IAM action it needs.
#[derive(Debug, Clone, Copy)]
pub struct Op {
    /// What rekey was doing ("reading", "staging a version of", ...).
    pub what: &'static str,
    /// The IAM action (`secretsmanager:GetSecretValue`).
    pub action: &'static str,
}

/// Operations rekey makes.
pub mod ops {
    use super::Op;
    /// ListSecretVersionIds.
    pub const LIST: Op = Op {
        what: "listing the versions of",
        action: "secretsmanager:ListSecretVersionIds",
    };
    /// GetSecretValue.
    pub const READ: Op = Op {
        what: "reading",
        action: "secretsmanager:GetSecretValue",
    };
    /// CreateSecret.
    pub const CREATE: Op = Op {
        what: "creating",
        action: "secretsmanager:CreateSecret",
    };
    /// PutSecretValue.
    pub const PUT: Op = Op {
        what: "writing a new version of",
        action: "secretsmanager:PutSecretValue",
    };
    /// UpdateSecretVersionStage.
    pub const LABEL: Op = Op {
        what: "moving the staging labels of",
        action: "secretsmanager:UpdateSecretVersionStage",
    };
    /// DescribeSecret.
    pub const DESCRIBE: Op = Op {
        what: "describing",
        action: "secretsmanager:DescribeSecret",
    };
    /// TagResource.
    pub const TAG: Op = Op {
        what: "tagging",
        action: "secretsmanager:TagResource",
    };
    /// DeleteSecret.
    pub const DELETE: Op = Op {
        what: "deleting",
        action: "secretsmanager:DeleteSecret",
    };
}

/// The sentence for a service error `code` (with AWS's `message`), pure so
/// every case is tested without a service.
pub fn sentence(op: Op, secret: &str, code: Option<&str>, message: Option<&str>) -> String {
    let what = op.what;
    match code.unwrap_or_default() {
        "ResourceNotFoundException" => format!(
            "secret {secret:?} does not exist ({what} it): create it with `rekey secrets init`, or check secret_id, region and endpoint in [keys]"
        ),
        "ResourceExistsException" => format!(
            "secret {secret:?} already exists: `rekey secrets init --adopt` takes it as it is (and writes nothing), or choose another secret_id"
        ),
        "AccessDeniedException" | "AccessDenied" | "UnrecognizedClientException"
        | "InvalidClientTokenId" | "ExpiredTokenException" | "InvalidSignatureException" => format!(
            "access denied {what} secret {secret:?}: the caller needs {} on it (check the AWS credentials and the IAM or resource policy)",
            op.action
        ),
        "DecryptionFailure" | "EncryptionFailure" => format!(
            "secret {secret:?} cannot be {}: the caller needs kms:Decrypt and kms:GenerateDataKey on the secret's KMS key",
            if code == Some("DecryptionFailure") { "decrypted" } else { "encrypted" }
        ),
        "InvalidRequestException" | "InvalidParameterException" | "LimitExceededException" => format!(
            "AWS Secrets Manager refused {what} secret {secret:?}: {}",
            message.unwrap_or("invalid request")
        ),
        "" => format!("AWS Secrets Manager failed {what} secret {secret:?}"),
        other => format!(
            "AWS Secrets Manager failed {what} secret {secret:?}: {other}{}",
            message.map(|m| format!(": {m}")).unwrap_or_default()
        ),
    }
}

/// The innermost cause of an error, as one line.
pub fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// An SDK error as one of rekey's: a sentence, never a debug dump.
pub fn aws_err<E, R>(op: Op, secret: &str, e: SdkError<E, R>) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug + 'static,
{
    match &e {
        SdkError::ServiceError(_) => {
            let msg = sentence(op, secret, e.code(), e.message());
            match e.code() {
                Some("ResourceNotFoundException" | "ResourceExistsException") => Error::Config(msg),
                _ => Error::Runtime(msg),
            }
        }
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) | SdkError::ResponseError(_) => {
            Error::Runtime(format!(
                "cannot reach AWS Secrets Manager {} secret {secret:?}: {} (check region, endpoint and network)",
                op.what,
                root_cause(&e)
            ))
        }
        _ => Error::Runtime(format!(
            "AWS Secrets Manager failed {} secret {secret:?}: {} (check the AWS credentials and region)",
            op.what,
            root_cause(&e)
        )),
    }
}

/// Whether an SDK error is the service saying the secret does not exist.
pub fn not_found<E: ProvideErrorMetadata, R>(e: &SdkError<E, R>) -> bool {
    matches!(e, SdkError::ServiceError(_)) && e.code() == Some("ResourceNotFoundException")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sentence_names_the_secret_and_the_fix() {
        let s = |code| sentence(ops::READ, "/app/key", Some(code), Some("AWS says no."));
        assert!(s("ResourceNotFoundException").contains("\"/app/key\" does not exist"));
        assert!(s("ResourceExistsException").contains("--adopt"));
        let denied = s("AccessDeniedException");
        assert!(
            denied.contains("secretsmanager:GetSecretValue") && denied.contains("\"/app/key\""),
            "{denied}"
        );
        assert!(s("DecryptionFailure").contains("kms:Decrypt"));
        assert!(s("InvalidRequestException").ends_with("AWS says no."));
        for code in [
            "ResourceNotFoundException",
            "AccessDeniedException",
            "Whatever",
        ] {
            let m = s(code);
            assert!(!m.contains("ServiceError") && !m.contains('{'), "{m}");
        }
    }
}
