output "cases" {
  description = "Per case: the rendered berth.toml, cloud-config and IAM policy JSON."
  value = {
    for name, m in { full        = module.full, minimal = module.minimal } : name => {
      berth_toml                 = m.berth_toml
      cloud_config               = m.cloud_config
      iam_policy_json            = m.iam_policy_json
      iam_policy_statement_count = m.iam_policy_statement_count
      session_manager_policy     = m.session_manager_policy_json
      drain_delay_seconds        = m.drain_delay_seconds
      health_path                = m.health_path
    }
  }
}
