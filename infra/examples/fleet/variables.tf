variable "region" {
  description = "AWS region."
  type        = string
}

variable "name" {
  description = "The app's name: prefix of every resource and of its SSM parameters."
  type        = string
  default     = "myapp"

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9-]{0,18}$", var.name))
    error_message = "name must be 1 to 19 characters of a-z, 0-9 and '-' (with environment it names the ALB, at most 26 characters)."
  }
}

variable "environment" {
  description = "Environment name, e.g. prod or staging."
  type        = string
  default     = "prod"

  validation {
    condition     = can(regex("^[a-z0-9]{1,6}$", var.environment))
    error_message = "environment must be 1 to 6 characters of a-z and 0-9."
  }
}

variable "domains" {
  description = "Names the app answers on: the ALB certificate, the Route53 alias records, berth's tls.domains and the app's routes."
  type        = list(string)
}

variable "route53_zone_id" {
  description = "Hosted zone of the domains: alias records to the ALB, and DNS validation of the ACM certificate."
  type        = string
}

variable "certificate_arn" {
  description = "An existing ACM certificate for the ALB; null: request one for the domains, validated through route53_zone_id."
  type        = string
  default     = null
}

# --- the app ---------------------------------------------------------------------------------------

variable "app_image" {
  description = "The app's image. An ECR reference (ACCOUNT.dkr.ecr.REGION.amazonaws.com/REPO:TAG) turns on registry_auth = \"ecr\" and grants pull on that repository only."
  type        = string
}

variable "app_port" {
  description = "The port the app listens on inside its container."
  type        = number
  default     = 8080
}

variable "app_health_path" {
  description = "The app's own health endpoint (berth probes it on the container port); null: a running container counts as healthy."
  type        = string
  default     = "/health"
}

variable "app_env" {
  description = "Plain (non-secret) environment variables of the app."
  type        = map(string)
  default     = {}
}

variable "secret_names" {
  description = "Secrets of the app, relative to /NAME/ENVIRONMENT/env/ (\"db/password\" becomes DB_PASSWORD). Terraform creates each as a SecureString placeholder; set the real values with `aws ssm put-parameter --overwrite` (docs/runbook.md)."
  type        = list(string)
  default     = []
}

variable "create_kms_key" {
  description = "Create a customer managed KMS key for the app's SecureStrings (the instance role may decrypt only through SSM). false: the AWS managed key alias/aws/ssm."
  type        = bool
  default     = true
}

# --- berth -----------------------------------------------------------------------------------------

variable "package_url" {
  description = "The berth package: https:// or s3:// (module berth-config, variable package_url; \"{format}\" and \"{arch}\" are filled in on the instance)."
  type        = string
}

variable "package_sha256" {
  description = "SHA-256 of the package, checked before installing; empty: not checked."
  type        = string
  default     = ""
}

variable "tls_mode" {
  description = "berth's tls.mode on the instances. \"self-signed\" is enough behind this ALB (it does not verify targets); \"acme\" gets a publicly trusted certificate on every instance (fleet mode: one order per renewal for the whole group), needed only when clients reach the instances without the ALB terminating TLS."
  type        = string
  default     = "self-signed"

  validation {
    condition     = contains(["self-signed", "acme"], var.tls_mode)
    error_message = "tls_mode must be \"self-signed\" or \"acme\"."
  }
}

variable "acme_contact" {
  description = "ACME account contact, e.g. [\"mailto:ops@example.com\"] (tls_mode = \"acme\")."
  type        = list(string)
  default     = []
}

variable "acme_directory" {
  description = "ACME directory URL; null: Let's Encrypt production. Use https://acme-staging-v02.api.letsencrypt.org/directory while trying things out (rate limits)."
  type        = string
  default     = null
}

variable "drain_delay" {
  description = "berth's agent.drain_delay; also the ALB deregistration delay."
  type        = string
  default     = "15s"
}

variable "drain_timeout" {
  description = "berth's agent.drain_timeout."
  type        = string
  default     = "30s"
}

# --- instances ---------------------------------------------------------------------------------------

variable "ami_id" {
  description = "AMI for the instances; null: the latest Amazon Linux 2023 for instance_architecture."
  type        = string
  default     = null
}

variable "instance_architecture" {
  description = "x86_64 or arm64 (Graviton), for the default AMI."
  type        = string
  default     = "x86_64"

  validation {
    condition     = contains(["x86_64", "arm64"], var.instance_architecture)
    error_message = "instance_architecture must be x86_64 or arm64."
  }
}

variable "instance_type" {
  description = "Instance type (match instance_architecture)."
  type        = string
  default     = "t3.small"
}

variable "min_size" {
  description = "Minimum instances."
  type        = number
  default     = 2
}

variable "max_size" {
  description = "Maximum instances."
  type        = number
  default     = 6
}

variable "desired_capacity" {
  description = "Instances at creation."
  type        = number
  default     = 2
}

variable "request_count_per_target" {
  description = "Scale on ALB requests per instance per minute; null: fixed size."
  type        = number
  default     = 1000
}

variable "enable_session_manager" {
  description = "Let operators open shells with Session Manager (a minimal policy, not AmazonSSMManagedInstanceCore)."
  type        = bool
  default     = true
}

# --- network -----------------------------------------------------------------------------------------

variable "vpc_cidr_block" {
  description = "The VPC's range."
  type        = string
  default     = "10.20.0.0/16"
}

variable "nat_gateways" {
  description = "\"single\", \"per-az\" or \"none\" (module network)."
  type        = string
  default     = "single"
}

variable "interface_endpoints" {
  description = "Interface VPC endpoints (module network): e.g. [\"ssm\", \"ecr.api\", \"ecr.dkr\", \"ssmmessages\"]."
  type        = list(string)
  default     = ["ssm"]
}

variable "tags" {
  description = "Extra tags for every resource."
  type        = map(string)
  default     = {}
}
