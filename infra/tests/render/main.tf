# A root with no providers: `terraform init` + `apply` here only evaluate templatefile and
# jsonencode, so tests/suites/infra.rs can render the user data and the IAM policy with no
# provider registry and check them (berth check, a YAML parse, the IAM rules).

# Everything a production fleet sets: fleet ACME, secrets from a path and named parameters
# (one through Secrets Manager), a customer managed KMS key, an ECR image, two apps.
module "full" {
  source = "../../modules/berth-config"

  region     = "eu-west-1"
  account_id = "123456789012"

  agent = {
    drain_delay   = "15s"
    drain_timeout = "30s"
  }
  secrets = {
    path             = "/myapp/prod/env/"
    parameters       = ["/shared/GITHUB_TOKEN", "/aws/reference/secretsmanager/myapp/db"]
    refresh_interval = "5m"
    on_change        = "redeploy"
  }
  tls = {
    mode    = "acme"
    domains = ["api.example.com", "admin.example.com"]
    acme = {
      contact                = ["mailto:ops@example.com"]
      shared                 = "/myapp/prod/berth"
      eab_kid                = "kid-1"
      eab_hmac_key_parameter = "/myapp/prod/acme-eab-key"
    }
  }
  apps = {
    web = {
      image         = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/myapp/web:1.4.2"
      port          = 8050
      routes        = ["api.example.com/"]
      env           = { LOG_LEVEL = "info", GREETING = "a \"quoted\" <value> with unicode: é" }
      registry_auth = "ecr"
      pull          = "always"
      memory        = "512m"
      cpus          = 1
      health = {
        path         = "/health"
        start_period = "60s"
      }
      restart = {
        max_backoff = "30s"
      }
    }
    admin = {
      image         = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/myapp/admin@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
      port          = 9000
      routes        = ["admin.example.com/"]
      secrets       = ["DB", "GITHUB_TOKEN"]
      registry_auth = "ecr"
      cpus          = 0.5
    }
  }

  kms_key_arns    = ["arn:aws:kms:eu-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"]
  package_url     = "s3://berth-artifacts-123456789012/berth/0.1.0/berth_0.1.0_{arch}.{format}"
  package_manager = "auto"
  session_manager = true
}

# The smallest useful fleet behind an ALB: defaults everywhere, a self-signed certificate
# (the ALB does not verify it), a public image, no secrets.
module "minimal" {
  source = "../../modules/berth-config"

  region         = "us-east-1"
  account_id     = "123456789012"
  package_url    = "https://downloads.example.com/berth/berth_0.1.0_amd64.deb"
  package_sha256 = "0000000000000000000000000000000000000000000000000000000000000000"

  apps = {
    web = {
      image = "public.ecr.aws/nginx/nginx:stable"
      port  = 80
    }
  }
}
