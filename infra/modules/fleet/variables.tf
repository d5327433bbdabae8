variable "name" {
  description = "Name of the Auto Scaling group, and prefix of the role, profile, security group and launch template."
  type        = string
}

variable "vpc_id" {
  description = "The VPC."
  type        = string
}

variable "subnet_ids" {
  description = "Private subnets, one per availability zone the group spreads over."
  type        = list(string)
}

# --- what the instances run ---------------------------------------------------------------------

variable "ami_id" {
  description = "AMI for the instances: Amazon Linux 2023, Debian or Ubuntu (the user data picks dnf or apt), or one with berth baked in."
  type        = string
}

variable "instance_type" {
  description = "Instance type."
  type        = string
  default     = "t3.small"
}

variable "key_name" {
  description = "EC2 key pair for SSH; null (the default) for none: use Session Manager."
  type        = string
  default     = null
}

variable "user_data_base64" {
  description = "The launch template's user data (module berth-config, output user_data_base64). A change makes a new launch template version, which starts an instance refresh."
  type        = string
}

variable "root_volume_size" {
  description = "Root volume size in GiB (Docker images live there)."
  type        = number
  default     = 20
}

variable "root_volume_kms_key_id" {
  description = "KMS key for the encrypted root volume; null: the account's default EBS key."
  type        = string
  default     = null
}

variable "metadata_hop_limit" {
  description = "IMDSv2 PUT response hop limit. 1 keeps the instance role's credentials away from the app containers (bridge networking is one more hop); berth runs on the host and needs only 1."
  type        = number
  default     = 1
}

# --- IAM ------------------------------------------------------------------------------------------

variable "assume_role_policy_json" {
  description = "Trust policy of the instance role (module berth-config, output assume_role_policy_json)."
  type        = string
}

variable "berth_policy_json" {
  description = "berth's least-privilege policy (module berth-config, output iam_policy_json)."
  type        = string
}

variable "attach_berth_policy" {
  description = "Attach berth_policy_json. Pass `module.<berth-config>.iam_policy_statement_count > 0`: a policy with no statements is rejected by IAM."
  type        = bool
  default     = true
}

variable "additional_policy_jsons" {
  description = "More inline policies by name, e.g. { session-manager = module.<berth-config>.session_manager_policy_json }. Keys must be known at plan time."
  type        = map(string)
  default     = {}
}

variable "permissions_boundary_arn" {
  description = "Permissions boundary for the instance role, if your organisation requires one."
  type        = string
  default     = null
}

# --- network --------------------------------------------------------------------------------------

variable "alb_security_group_id" {
  description = "The ALB's security group: the only source allowed into berth's ports."
  type        = string
}

variable "http_port" {
  description = "berth's :80 listener (module berth-config, output http_port)."
  type        = number
  default     = 80
}

variable "https_port" {
  description = "berth's :443 listener (module berth-config, output https_port)."
  type        = number
  default     = 443
}

variable "egress_cidr_blocks" {
  description = "Where the instances may open HTTPS (AWS APIs, registries, ACME) and HTTP (package mirrors, OCSP) connections."
  type        = list(string)
  default     = ["0.0.0.0/0"]
}

variable "additional_security_group_ids" {
  description = "More security groups for the instances."
  type        = list(string)
  default     = []
}

# --- the group ------------------------------------------------------------------------------------

variable "target_group_arns" {
  description = "Target groups the instances register with (module alb, output target_group_arns)."
  type        = list(string)
}

variable "min_size" {
  description = "Minimum instances."
  type        = number
  default     = 2
}

variable "max_size" {
  description = "Maximum instances (instance refresh launches up to max_healthy_percentage above desired, within this)."
  type        = number
  default     = 4
}

variable "desired_capacity" {
  description = "Instances at creation. Terraform ignores later drift (scaling policies own it)."
  type        = number
  default     = 2
}

variable "health_check_grace_period" {
  description = "Seconds after launch before a failing ELB health check replaces an instance: package install, image pull and the app's start_period must fit."
  type        = number
  default     = 300
}

variable "instance_warmup" {
  description = "Seconds a new instance needs before it counts as in service for instance refresh and scaling."
  type        = number
  default     = 180
}

variable "refresh_min_healthy_percentage" {
  description = "Instance refresh: capacity kept in service while replacing instances."
  type        = number
  default     = 100
}

variable "refresh_max_healthy_percentage" {
  description = "Instance refresh: capacity allowed above desired (200 = launch all replacements before terminating)."
  type        = number
  default     = 200
}

variable "drain_delay_seconds" {
  description = "berth's agent.drain_delay (module berth-config, output drain_delay_seconds)."
  type        = number
}

variable "drain_timeout_seconds" {
  description = "berth's agent.drain_timeout (module berth-config, output drain_timeout_seconds)."
  type        = number
}

variable "termination_hook" {
  description = "Add a termination lifecycle hook that holds a leaving instance (already deregistered from the ALB) in Terminating:Wait for drain_delay + drain_timeout before shutdown. Nothing needs to complete it; see docs/runbook.md, \"Scale-in and drain\"."
  type        = bool
  default     = true
}

variable "request_count_per_target" {
  description = "Target-tracking scaling on ALBRequestCountPerTarget (requests per instance per minute); null: no scaling policy."
  type        = number
  default     = null
}

variable "request_count_resource_label" {
  description = "ALB and target group for request_count_per_target (module alb, output request_count_resource_label)."
  type        = string
  default     = null
}

variable "tags" {
  description = "Tags for every resource, propagated to the instances."
  type        = map(string)
  default     = {}
}
