output "berth_toml" {
  description = "The text of /etc/berth/berth.toml."
  value       = local.berth_toml

  precondition {
    condition     = !local.fleet_prefix_under_app_path
    error_message = "tls.acme.shared must not lie under secrets.path: berth reads secrets.path recursively, so the fleet's ACME account key and certificate key would become environment variables of the app. Use a sibling prefix, e.g. secrets.path = \"/myapp/prod/env/\" and tls.acme.shared = \"/myapp/prod/berth\"."
  }

  precondition {
    condition     = length(local.ecr_apps) == 0 || length(local.ecr_repository_arns) > 0
    error_message = "An app has registry_auth = \"ecr\" but its image is not an ECR reference (ACCOUNT.dkr.ecr.REGION.amazonaws.com/REPO:TAG); list its repositories in ecr_repository_arns."
  }
}

output "config_path" {
  description = "Where the user data writes berth.toml."
  value       = local.config_path
}

output "cloud_config" {
  description = "The user data: a #cloud-config document that writes berth.toml (0600), installs berth and runs `systemctl enable --now --no-block berth.socket berth.service`."
  value       = local.cloud_config
}

output "user_data_base64" {
  description = "cloud_config, base64-encoded for aws_launch_template.user_data."
  value       = base64encode(local.cloud_config)
}

output "config_sha256" {
  description = "SHA-256 of berth.toml; changes whenever the rendered config does."
  value       = sha256(local.berth_toml)
}

output "iam_policy_json" {
  description = "The instance role's policy: exactly what berth calls, on exactly these resources. See docs/iam.md."
  value       = local.iam_policy_json
}

output "iam_policy_statement_count" {
  description = "How many statements iam_policy_json has (0: berth needs no AWS permissions; do not attach an empty policy). Known at plan time even when ARNs are not."
  value       = length(local.statements)
}

output "assume_role_policy_json" {
  description = "Trust policy letting EC2 instances assume the role."
  value       = local.assume_role_policy_json
}

output "drain_delay_seconds" {
  description = "agent.drain_delay in seconds: the ALB target groups' deregistration delay."
  value       = local.drain_delay_seconds
}

output "drain_timeout_seconds" {
  description = "agent.drain_timeout in seconds."
  value       = local.drain_timeout_seconds
}

output "health_path" {
  description = "http.health_path: the path the ALB target groups check."
  value       = var.http.health_path
}

output "http_port" {
  description = "Port of berth's :80 listener (ACME http-01, health, redirect)."
  value       = local.http_port
}

output "https_port" {
  description = "Port of berth's :443 listener."
  value       = local.https_port
}

output "fleet_prefix" {
  description = "tls.acme.shared when fleet ACME is on, else null."
  value       = local.fleet_prefix
}

output "secret_parameter_arns" {
  description = "SSM ARNs the instances may read (the path's children and every named parameter)."
  value       = local.read_arns
}

output "session_manager_policy_json" {
  description = "With session_manager = true: a policy for Session Manager shells that grants no parameter access. Else null."
  value       = local.session_manager_policy_json
}
