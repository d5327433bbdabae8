# One app on an Auto Scaling group of berth instances behind an ALB:
#   network (VPC, 2 AZs, NAT and/or endpoints) -> alb (:80/:443, ACM, Route53)
#   -> fleet (launch template with berth's user data, ASG, instance profile).
# berth-config renders berth.toml, the user data and the IAM policy from one set of inputs.

data "aws_caller_identity" "current" {}
data "aws_partition" "current" {}
data "aws_region" "current" {}

data "aws_ssm_parameter" "al2023" {
  count = var.ami_id == null ? 1 : 0
  name  = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-${var.instance_architecture}"
}

locals {
  full_name = "${var.name}-${var.environment}"

  # Secrets and berth's fleet state are siblings, never nested: berth reads secrets_path
  # recursively into the app's environment.
  secrets_path = "/${var.name}/${var.environment}/env/"
  fleet_prefix = "/${var.name}/${var.environment}/berth"

  ecr_image = can(regex("^[0-9]{12}\\.dkr\\.ecr\\.", var.app_image))
  ami_id    = var.ami_id != null ? var.ami_id : nonsensitive(data.aws_ssm_parameter.al2023[0].value)
}

# --- secrets: placeholders only -------------------------------------------------------------------

resource "aws_kms_key" "secrets" {
  count = var.create_kms_key ? 1 : 0

  description             = "SecureString parameters of ${local.full_name}"
  enable_key_rotation     = true
  deletion_window_in_days = 30
}

resource "aws_kms_alias" "secrets" {
  count = var.create_kms_key ? 1 : 0

  name          = "alias/${local.full_name}-secrets"
  target_key_id = aws_kms_key.secrets[0].key_id
}

# Terraform creates each parameter once with a placeholder and never looks at the value again
# (ignore_changes): the real value is put with the AWS CLI and stays out of plans. The AWS
# provider still reads the current value into state on refresh, so keep state encrypted and
# access-controlled (see docs/security.md).
resource "aws_ssm_parameter" "secret" {
  for_each = toset(var.secret_names)

  name        = "${local.secrets_path}${each.value}"
  description = "Secret of ${local.full_name}; set with: aws ssm put-parameter --overwrite --type SecureString --name ${local.secrets_path}${each.value} --value ..."
  type        = "SecureString"
  key_id      = var.create_kms_key ? aws_kms_key.secrets[0].arn : null
  value       = "placeholder: set with aws ssm put-parameter --overwrite"

  lifecycle {
    ignore_changes = [value, description]
  }
}

# --- certificate for the ALB -------------------------------------------------------------------------

resource "aws_acm_certificate" "alb" {
  count = var.certificate_arn == null ? 1 : 0

  domain_name               = var.domains[0]
  subject_alternative_names = slice(var.domains, 1, length(var.domains))
  validation_method         = "DNS"

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_route53_record" "acm_validation" {
  for_each = var.certificate_arn != null ? {} : {
    for o in aws_acm_certificate.alb[0].domain_validation_options : o.domain_name => o
  }

  zone_id         = var.route53_zone_id
  name            = each.value.resource_record_name
  type            = each.value.resource_record_type
  records         = [each.value.resource_record_value]
  ttl             = 300
  allow_overwrite = true
}

resource "aws_acm_certificate_validation" "alb" {
  count = var.certificate_arn == null ? 1 : 0

  certificate_arn         = aws_acm_certificate.alb[0].arn
  validation_record_fqdns = [for r in aws_route53_record.acm_validation : r.fqdn]
}

# --- the modules ---------------------------------------------------------------------------------------

module "network" {
  source = "../../modules/network"

  name                = local.full_name
  cidr_block          = var.vpc_cidr_block
  nat_gateways        = var.nat_gateways
  interface_endpoints = var.interface_endpoints
}

module "berth_config" {
  source = "../../modules/berth-config"

  region     = data.aws_region.current.name
  account_id = data.aws_caller_identity.current.account_id
  partition  = data.aws_partition.current.partition
  dns_suffix = data.aws_partition.current.dns_suffix

  agent = {
    drain_delay   = var.drain_delay
    drain_timeout = var.drain_timeout
  }

  secrets = length(var.secret_names) == 0 ? {} : {
    path      = local.secrets_path
    on_change = "redeploy"
  }

  tls = var.tls_mode == "acme" ? {
    mode    = "acme"
    domains = var.domains
    acme = {
      directory = var.acme_directory
      contact   = var.acme_contact
      shared    = local.fleet_prefix
    }
    } : {
    mode    = "self-signed"
    domains = var.domains
    acme    = null
  }

  apps = {
    web = {
      image         = var.app_image
      port          = var.app_port
      routes        = [for d in var.domains : "${d}/"]
      env           = var.app_env
      registry_auth = local.ecr_image ? "ecr" : null
      pull          = "always"
      health        = var.app_health_path == null ? null : { path = var.app_health_path }
    }
  }

  kms_key_arns    = var.create_kms_key ? [aws_kms_key.secrets[0].arn] : []
  package_url     = var.package_url
  package_sha256  = var.package_sha256
  session_manager = var.enable_session_manager
}

module "alb" {
  source = "../../modules/alb"

  name                 = local.full_name
  vpc_id               = module.network.vpc_id
  vpc_cidr_block       = module.network.vpc_cidr_block
  subnet_ids           = module.network.public_subnet_ids
  certificate_arn      = var.certificate_arn != null ? var.certificate_arn : aws_acm_certificate_validation.alb[0].certificate_arn
  http_port            = module.berth_config.http_port
  https_port           = module.berth_config.https_port
  health_path          = module.berth_config.health_path
  deregistration_delay = module.berth_config.drain_delay_seconds
  route53_zone_id      = var.route53_zone_id
  dns_names            = var.domains
}

module "fleet" {
  source = "../../modules/fleet"

  name          = local.full_name
  vpc_id        = module.network.vpc_id
  subnet_ids    = module.network.private_subnet_ids
  ami_id        = local.ami_id
  instance_type = var.instance_type

  user_data_base64        = module.berth_config.user_data_base64
  assume_role_policy_json = module.berth_config.assume_role_policy_json
  berth_policy_json       = module.berth_config.iam_policy_json
  attach_berth_policy     = module.berth_config.iam_policy_statement_count > 0
  additional_policy_jsons = var.enable_session_manager ? { "session-manager" = module.berth_config.session_manager_policy_json } : {}

  alb_security_group_id = module.alb.security_group_id
  http_port             = module.berth_config.http_port
  https_port            = module.berth_config.https_port
  target_group_arns     = module.alb.target_group_arns

  min_size              = var.min_size
  max_size              = var.max_size
  desired_capacity      = var.desired_capacity
  drain_delay_seconds   = module.berth_config.drain_delay_seconds
  drain_timeout_seconds = module.berth_config.drain_timeout_seconds

  request_count_per_target     = var.request_count_per_target
  request_count_resource_label = module.alb.request_count_resource_label

  # The first boot needs its secrets to exist (berth waits, with backoff, until the path
  # has parameters) and the instance role's policy in place.
  depends_on = [aws_ssm_parameter.secret]
}

# --- checks (warnings at plan time) ------------------------------------------------------------------

check "acme_needs_internet" {
  assert {
    condition     = var.tls_mode != "acme" || var.nat_gateways != "none"
    error_message = "tls_mode = \"acme\" with nat_gateways = \"none\": the ACME CA is on the Internet, berth cannot order certificates (it keeps serving its self-signed one)."
  }
}

check "non_ecr_image_needs_internet" {
  assert {
    condition     = local.ecr_image || var.nat_gateways != "none"
    error_message = "app_image is not in ECR and nat_gateways = \"none\": the instances cannot pull it."
  }
}
