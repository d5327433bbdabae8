//! The one AWS SDK configuration every berth client (SSM now; ECR and the fleet ACME store
//! later) is built from, so `[aws]` means the same thing everywhere.

use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};

use crate::config::AwsConfig;

/// An unroutable endpoint (a private subnet without a VPC endpoint or NAT) must fail fast
/// enough for berth to say so in the systemd status line, not hang the boot.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// One request/response. SSM answers in well under a second; 10 s covers a slow KMS decrypt.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// All SDK attempts of one call together, so the SDK's retries never outlast ours.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(45);
/// The SDK retries a call a few times; berth's own backoff (see `secrets`) wraps whole
/// fetches, which is what keeps a fleet from stampeding when SSM throttles for minutes.
const MAX_ATTEMPTS: u32 = 4;
const MAX_SDK_BACKOFF: Duration = Duration::from_secs(10);

/// Loads the shared SDK configuration: credentials from the default chain (env, profile,
/// IMDSv2 instance profile), region from `[aws] region` or that chain, and `endpoint_url`
/// (or `AWS_ENDPOINT_URL`) for every client built from it.
///
/// Adaptive retry mode adds a client-side rate limiter on top of standard retries: after a
/// throttle, this instance slows itself down instead of retrying at full speed.
pub async fn sdk_config(aws: &AwsConfig) -> SdkConfig {
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .retry_config(RetryConfig::adaptive().with_max_attempts(MAX_ATTEMPTS).with_max_backoff(MAX_SDK_BACKOFF))
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(CONNECT_TIMEOUT)
                .operation_attempt_timeout(ATTEMPT_TIMEOUT)
                .operation_timeout(OPERATION_TIMEOUT)
                .build(),
        );
    if let Some(region) = &aws.region {
        loader = loader.region(Region::new(region.clone()));
    }
    if let Some(url) = &aws.endpoint_url {
        loader = loader.endpoint_url(url);
    }
    let config = loader.load().await;
    tracing::debug!(
        region = config.region().map(|r| r.as_ref()).unwrap_or("<none>"),
        endpoint_url = config.endpoint_url().unwrap_or("<default>"),
        "AWS SDK configured"
    );
    config
}

/// The SSM endpoint calls go to, for messages: the override if there is one, else the
/// public regional endpoint the SDK resolves.
pub fn ssm_endpoint(config: &SdkConfig) -> String {
    match (config.endpoint_url(), config.region()) {
        (Some(url), _) => url.to_string(),
        (None, Some(region)) => format!("https://ssm.{region}.amazonaws.com"),
        (None, None) => "SSM (no region)".to_string(),
    }
}

/// The ARN partition a region belongs to, for the IAM policy berth tells operators to write.
pub fn partition(region: &str) -> &'static str {
    if region.starts_with("cn-") {
        "aws-cn"
    } else if region.starts_with("us-gov-") {
        "aws-us-gov"
    } else if region.starts_with("us-iso-") {
        "aws-iso"
    } else if region.starts_with("us-isob-") {
        "aws-iso-b"
    } else {
        "aws"
    }
}

/// Fixed credentials for tests: moto takes any, and none may come from the machine's own.
#[cfg(test)]
pub(crate) fn test_credentials() -> aws_sdk_ssm::config::SharedCredentialsProvider {
    use aws_sdk_ssm::config::{Credentials, SharedCredentialsProvider};
    SharedCredentialsProvider::new(Credentials::new("testing", "testing", None, None, "berth-tests"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn config_region_and_endpoint_win() {
        let c = sdk_config(&AwsConfig {
            region: Some("eu-west-3".into()),
            endpoint_url: Some("http://127.0.0.1:1".into()),
        })
        .await;
        assert_eq!(c.region().map(|r| r.as_ref()), Some("eu-west-3"));
        assert_eq!(c.endpoint_url(), Some("http://127.0.0.1:1"));
        assert_eq!(ssm_endpoint(&c), "http://127.0.0.1:1");
        let t = c.timeout_config().unwrap();
        assert_eq!(t.connect_timeout(), Some(CONNECT_TIMEOUT));
        assert_eq!(t.operation_attempt_timeout(), Some(ATTEMPT_TIMEOUT));
        let r = c.retry_config().unwrap();
        assert_eq!(r.max_attempts(), MAX_ATTEMPTS);
        assert_eq!(r.mode(), aws_config::retry::RetryMode::Adaptive);
    }

    #[test]
    fn partitions() {
        assert_eq!(partition("us-east-1"), "aws");
        assert_eq!(partition("cn-north-1"), "aws-cn");
        assert_eq!(partition("us-gov-west-1"), "aws-us-gov");
    }
}
