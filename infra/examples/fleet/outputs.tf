output "urls" {
  description = "Where the app answers."
  value       = [for d in var.domains : "https://${d}/"]
}

output "alb_dns_name" {
  description = "The ALB's own name (for testing before DNS moves)."
  value       = module.alb.dns_name
}

output "autoscaling_group_name" {
  description = "For `aws autoscaling start-instance-refresh --auto-scaling-group-name ...`."
  value       = module.fleet.autoscaling_group_name
}

output "instance_role_arn" {
  description = "The role berth runs with."
  value       = module.fleet.role_arn
}

output "secrets_path" {
  description = "Put the app's secrets here (SecureString)."
  value       = local.secrets_path
}

output "secret_parameter_names" {
  description = "The placeholders Terraform created; overwrite each with its real value."
  value       = [for p in aws_ssm_parameter.secret : p.name]
}

output "fleet_acme_prefix" {
  description = "Where berth keeps the fleet's ACME account, lock and certificate (tls_mode = \"acme\")."
  value       = module.berth_config.fleet_prefix
}

output "berth_toml" {
  description = "The /etc/berth/berth.toml every instance gets (no secret values: only parameter names)."
  value       = module.berth_config.berth_toml
}
