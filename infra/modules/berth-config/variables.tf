# Inputs mirror /etc/berth/berth.toml (SPEC.md, "Configuration") table by table. An attribute
# left null is not written, so berth's own default applies; `berth check` on the instance
# (and in tests/suites/infra.rs) is the final word on what is valid.

# --- where the instances run (used for IAM ARNs and `[aws] region`) -------------------------

variable "region" {
  description = "AWS region the fleet runs in. Written to `[aws] region` and used in every ARN of the IAM policy."
  type        = string

  validation {
    condition     = can(regex("^[a-z]{2}(-[a-z]+)+-[0-9]+$", var.region))
    error_message = "region must be a region name like \"us-east-1\"."
  }
}

variable "account_id" {
  description = "AWS account ID that owns the SSM parameters, KMS keys and ECR repositories (12 digits). Used in ARNs only."
  type        = string

  validation {
    condition     = can(regex("^[0-9]{12}$", var.account_id))
    error_message = "account_id must be 12 digits."
  }
}

variable "partition" {
  description = "AWS partition for ARNs: aws, aws-cn or aws-us-gov."
  type        = string
  default     = "aws"

  validation {
    condition     = contains(["aws", "aws-cn", "aws-us-gov"], var.partition)
    error_message = "partition must be aws, aws-cn or aws-us-gov."
  }
}

variable "dns_suffix" {
  description = "DNS suffix of the partition's service endpoints, used in the kms:ViaService condition (amazonaws.com; amazonaws.com.cn in China)."
  type        = string
  default     = "amazonaws.com"
}

# --- berth.toml ------------------------------------------------------------------------------

variable "agent" {
  description = "`[agent]`. drain_delay / drain_timeout are also exported in seconds for the ALB deregistration delay and the termination lifecycle hook, so they accept only a number with one unit (ms, s, m, h), e.g. \"15s\"."
  type = object({
    state_dir      = optional(string)
    admin_socket   = optional(string)
    metrics_listen = optional(string)
    drain_delay    = optional(string, "15s")
    drain_timeout  = optional(string, "30s")
  })
  default = {}

  validation {
    condition = alltrue([
      for d in [var.agent.drain_delay, var.agent.drain_timeout] : can(regex("^[0-9]+(ms|s|m|h)$", d))
    ])
    error_message = "agent.drain_delay and agent.drain_timeout must be a number and one unit, like \"15s\" or \"2m\"."
  }
}

variable "aws_endpoint_url" {
  description = "`[aws] endpoint_url`: one URL for every AWS call berth makes. Leave null on EC2, including with interface VPC endpoints (their private DNS makes the default endpoints resolve into the VPC)."
  type        = string
  default     = null
}

variable "secrets" {
  description = "`[secrets]`: path (GetParametersByPath, recursive), parameters (extra names, including /aws/reference/secretsmanager/NAME), refresh_interval, on_change."
  type = object({
    path             = optional(string)
    parameters       = optional(list(string), [])
    refresh_interval = optional(string)
    on_change        = optional(string)
  })
  default = {}

  validation {
    condition     = var.secrets.path == null || can(regex("^(/[A-Za-z0-9_.-]+)+/?$", coalesce(var.secrets.path, "/x")))
    error_message = "secrets.path must be an SSM hierarchy with at least one level, like \"/myapp/prod/\" (\"/\" alone would read every parameter in the account)."
  }

  validation {
    condition     = var.secrets.on_change == null || contains(["redeploy", "ignore"], coalesce(var.secrets.on_change, "redeploy"))
    error_message = "secrets.on_change must be \"redeploy\" or \"ignore\"."
  }
}

variable "http" {
  description = "`[http]`: the :80 listener (ACME http-01, health, redirect to https) and the health path the ALB checks."
  type = object({
    listen      = optional(string)
    health_path = optional(string, "/_berth/health")
  })
  default = {}
}

variable "https" {
  description = "`[https]`: the :443 listener."
  type = object({
    listen = optional(string)
  })
  default = {}
}

variable "tls" {
  description = "`[tls]` and `[tls.acme]`. mode is \"self-signed\" (enough behind an ALB, which does not verify target certificates), \"acme\" or \"files\". acme.shared is the SSM prefix for fleet ACME state; it must not lie under secrets.path."
  type = object({
    mode      = optional(string, "self-signed")
    domains   = optional(list(string), [])
    cert_file = optional(string)
    key_file  = optional(string)
    acme = optional(object({
      directory = optional(string)
      contact   = optional(list(string), [])
      ca_bundle = optional(string)
      shared    = optional(string)
      # External Account Binding, for CAs that require it: the key id, and the SSM
      # SecureString holding the MAC key (never the key itself: user data is not secret).
      eab_kid                = optional(string)
      eab_hmac_key_parameter = optional(string)
    }))
  })
  default = {}

  validation {
    condition     = contains(["acme", "self-signed", "files"], var.tls.mode)
    error_message = "tls.mode must be \"acme\", \"self-signed\" or \"files\"."
  }

  validation {
    condition     = try(var.tls.acme.shared, null) == null || can(regex("^(/[A-Za-z0-9_.-]+)+$", try(var.tls.acme.shared, "")))
    error_message = "tls.acme.shared must be an SSM prefix like \"/myapp/prod/berth\": a leading '/', no trailing '/'."
  }

  validation {
    condition     = (try(var.tls.acme.eab_kid, null) == null) == (try(var.tls.acme.eab_hmac_key_parameter, null) == null)
    error_message = "tls.acme.eab_kid and tls.acme.eab_hmac_key_parameter come as a pair: set both or neither."
  }

  validation {
    condition     = try(var.tls.acme.eab_hmac_key_parameter, null) == null || can(regex("^(/[A-Za-z0-9_.-]+)+$", try(var.tls.acme.eab_hmac_key_parameter, "")))
    error_message = "tls.acme.eab_hmac_key_parameter must be an SSM parameter name like \"/myapp/prod/acme-eab-key\"."
  }
}

variable "apps" {
  description = <<-EOT
    `[apps.NAME]`, one entry per container (NAME: a-z, 0-9, '-').
    secrets: null writes nothing (berth's default "all"); a list selects mapped names, [] gives the app none.
    registry_auth: "none" or "ecr"; registry_credentials: SSM parameter *names* for basic auth (overrides registry_auth).
    health / restart: the `[apps.NAME.health]` / `[apps.NAME.restart]` tables.
  EOT
  type = map(object({
    image                = string
    port                 = number
    routes               = optional(list(string), [])
    env                  = optional(map(string), {})
    secrets              = optional(list(string))
    pull                 = optional(string)
    registry_auth        = optional(string)
    registry_credentials = optional(object({ username = string, password = string }))
    watch_image          = optional(string)
    memory               = optional(string)
    cpus                 = optional(number)
    stop_timeout         = optional(string)
    health = optional(object({
      path                = optional(string)
      interval            = optional(string)
      timeout             = optional(string)
      healthy_threshold   = optional(number)
      unhealthy_threshold = optional(number)
      start_period        = optional(string)
    }))
    restart = optional(object({
      initial_backoff = optional(string)
      max_backoff     = optional(string)
    }))
  }))
  default = {}

  validation {
    condition     = alltrue([for name in keys(var.apps) : can(regex("^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$", name))])
    error_message = "App names may contain only a-z, 0-9 and '-', must not start or end with '-', and are at most 63 characters."
  }

  validation {
    condition     = alltrue([for a in values(var.apps) : a.registry_auth == null || contains(["none", "ecr"], coalesce(a.registry_auth, "none"))])
    error_message = "apps.*.registry_auth must be \"none\" or \"ecr\" (use registry_credentials for basic auth)."
  }
}

# --- IAM extras --------------------------------------------------------------------------------

variable "kms_key_arns" {
  description = "Customer managed KMS keys that encrypt the SecureString parameters berth reads. Granted kms:Decrypt only through SSM (kms:ViaService). Leave empty when the parameters use the AWS managed key alias/aws/ssm: its key policy already allows use through SSM."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for k in var.kms_key_arns : can(regex("^arn:[a-z-]+:kms:[a-z0-9-]+:[0-9]{12}:key/[A-Za-z0-9-]+$", k))])
    error_message = "kms_key_arns must be key ARNs (arn:aws:kms:REGION:ACCOUNT:key/ID), not aliases or \"*\"."
  }
}

variable "ecr_repository_arns" {
  description = "Extra ECR repositories the instances may pull from (e.g. for `berth deploy --image`). Repositories of apps with registry_auth = \"ecr\" are derived from their image references."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for r in var.ecr_repository_arns : can(regex("^arn:[a-z-]+:ecr:[a-z0-9-]+:[0-9]{12}:repository/.+$", r))])
    error_message = "ecr_repository_arns must be repository ARNs, not \"*\"."
  }
}

# --- cloud-config: installing berth ------------------------------------------------------------

variable "package_url" {
  description = <<-EOT
    Where the instance downloads the berth package: an https:// URL or an s3:// object (s3:// needs the AWS CLI on the AMI, as on Amazon Linux 2023; the instance role gets s3:GetObject on that one object).
    "{format}" is replaced by deb or rpm and "{arch}" by the package architecture (amd64/arm64 for deb, x86_64/aarch64 for rpm), so one URL serves both AMI families.
    Empty: berth is already installed in the AMI.
  EOT
  type        = string

  validation {
    condition     = var.package_url == "" || can(regex("^(https|s3)://[A-Za-z0-9._~:/?=&%+{}-]+$", var.package_url))
    error_message = "package_url must be an https:// or s3:// URL (letters, digits and ._~:/?=&%+{}- only), or empty for a baked AMI."
  }
}

variable "package_sha256" {
  description = "SHA-256 of the package; the install step refuses a download that does not match. Empty skips the check (only sensible with {format}/{arch} in package_url or a trusted source)."
  type        = string
  default     = ""

  validation {
    condition     = var.package_sha256 == "" || can(regex("^[0-9a-f]{64}$", var.package_sha256))
    error_message = "package_sha256 must be 64 lower-case hex digits, or empty."
  }
}

variable "package_manager" {
  description = "\"auto\" (apt-get if present, else dnf), \"apt\" (Debian, Ubuntu) or \"dnf\" (Amazon Linux 2023, RHEL-likes)."
  type        = string
  default     = "auto"

  validation {
    condition     = contains(["auto", "apt", "dnf"], var.package_manager)
    error_message = "package_manager must be auto, apt or dnf."
  }
}

variable "install_docker" {
  description = "Install and enable Docker from the distribution (docker.io on Debian/Ubuntu, docker on Amazon Linux 2023). Turn off for AMIs that already have it."
  type        = bool
  default     = true
}

variable "session_manager" {
  description = "Also render session_manager_policy_json: the minimum for Session Manager shells and Run Command (instead of AmazonSSMManagedInstanceCore, which allows ssm:GetParameter(s) on every parameter in the account)."
  type        = bool
  default     = false
}
