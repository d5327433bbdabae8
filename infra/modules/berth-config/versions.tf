# Provider-free on purpose: this module only computes strings (berth.toml, the cloud-config
# user data, IAM policy JSON), so `terraform init` + `apply` work with no provider registry
# and the test suite can render and check everything offline (tests/suites/infra.rs).
terraform {
  required_version = ">= 1.5.0"
}
