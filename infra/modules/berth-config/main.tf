# Renders, from one set of inputs:
#   - /etc/berth/berth.toml (the schema of SPEC.md; every value is written with jsonencode,
#     whose strings, numbers and arrays are also valid TOML),
#   - the cloud-config user data that installs berth and starts it,
#   - the instance role's IAM policy, as a JSON string (plain jsonencode, no
#     aws_iam_policy_document data source, so no provider is needed to render it).

locals {
  config_path = "/etc/berth/berth.toml"

  # --- durations the AWS side needs in seconds --------------------------------------------
  unit_ms               = { ms = 1, s = 1000, m = 60000, h = 3600000 }
  drain_delay_parts     = regex("^([0-9]+)(ms|s|m|h)$", var.agent.drain_delay)
  drain_timeout_parts   = regex("^([0-9]+)(ms|s|m|h)$", var.agent.drain_timeout)
  drain_delay_seconds   = ceil(tonumber(local.drain_delay_parts[0]) * local.unit_ms[local.drain_delay_parts[1]] / 1000)
  drain_timeout_seconds = ceil(tonumber(local.drain_timeout_parts[0]) * local.unit_ms[local.drain_timeout_parts[1]] / 1000)

  http_port  = try(tonumber(regex(":([0-9]+)$", var.http.listen)[0]), 80)
  https_port = try(tonumber(regex(":([0-9]+)$", var.https.listen)[0]), 443)

  # --- berth.toml ---------------------------------------------------------------------------
  # Each section is a header and its `key = value` lines; a null input writes no line, so
  # berth's default applies. Pairs keep SPEC.md's key order.
  acme = var.tls.acme

  agent_lines = [for kv in [
    ["state_dir", var.agent.state_dir],
    ["admin_socket", var.agent.admin_socket],
    ["metrics_listen", var.agent.metrics_listen],
    ["drain_delay", var.agent.drain_delay],
    ["drain_timeout", var.agent.drain_timeout],
  ] : "${kv[0]} = ${jsonencode(kv[1])}" if kv[1] != null]

  aws_lines = [for kv in [
    ["region", var.region],
    ["endpoint_url", var.aws_endpoint_url],
  ] : "${kv[0]} = ${jsonencode(kv[1])}" if kv[1] != null]

  secrets_lines = [for kv in [
    ["path", var.secrets.path],
    ["parameters", length(var.secrets.parameters) == 0 ? null : var.secrets.parameters],
    ["refresh_interval", var.secrets.refresh_interval],
    ["on_change", var.secrets.on_change],
  ] : "${kv[0]} = ${jsonencode(kv[1])}" if kv[1] != null]

  http_lines = [for kv in [
    ["listen", var.http.listen],
    ["health_path", var.http.health_path],
  ] : "${kv[0]} = ${jsonencode(kv[1])}" if kv[1] != null]

  https_lines = [for kv in [
    ["listen", var.https.listen],
  ] : "${kv[0]} = ${jsonencode(kv[1])}" if kv[1] != null]

  tls_lines = [for kv in [
    ["mode", var.tls.mode],
    ["domains", length(var.tls.domains) == 0 ? null : var.tls.domains],
    ["cert_file", var.tls.cert_file],
    ["key_file", var.tls.key_file],
  ] : "${kv[0]} = ${jsonencode(kv[1])}" if kv[1] != null]

  acme_lines = local.acme == null ? [] : [for kv in [
    ["directory", local.acme.directory],
    ["contact", length(local.acme.contact) == 0 ? null : local.acme.contact],
    ["ca_bundle", local.acme.ca_bundle],
    ["shared", local.acme.shared],
    ["eab_kid", local.acme.eab_kid],
    ["eab_hmac_key_parameter", local.acme.eab_hmac_key_parameter],
  ] : "${kv[0]} = ${jsonencode(kv[1])}" if kv[1] != null]

  app_sections = flatten([for name in sort(keys(var.apps)) : [
    {
      header = "apps.${name}"
      lines = concat(
        [for kv in [
          ["image", var.apps[name].image],
          ["port", var.apps[name].port],
          ["routes", length(var.apps[name].routes) == 0 ? null : var.apps[name].routes],
        ] : "${kv[0]} = ${jsonencode(kv[1])}" if kv[1] != null],
        # An inline table; keys are quoted, so any name berth accepts is valid TOML.
        length(var.apps[name].env) == 0 ? [] : [
          "env = { ${join(", ", [for k in sort(keys(var.apps[name].env)) : "${jsonencode(k)} = ${jsonencode(var.apps[name].env[k])}"])} }"
        ],
        [for kv in [
          ["secrets", var.apps[name].secrets],
          ["pull", var.apps[name].pull],
          ["registry_auth", var.apps[name].registry_credentials == null ? var.apps[name].registry_auth : null],
        ] : "${kv[0]} = ${jsonencode(kv[1])}" if kv[1] != null],
        var.apps[name].registry_credentials == null ? [] : [
          "registry_auth = { username = ${jsonencode(var.apps[name].registry_credentials.username)}, password = ${jsonencode(var.apps[name].registry_credentials.password)} }"
        ],
        [for kv in [
          ["watch_image", var.apps[name].watch_image],
          ["memory", var.apps[name].memory],
          ["cpus", var.apps[name].cpus],
          ["stop_timeout", var.apps[name].stop_timeout],
        ] : "${kv[0]} = ${jsonencode(kv[1])}" if kv[1] != null],
      )
    },
    {
      header = "apps.${name}.health"
      lines = var.apps[name].health == null ? [] : [for kv in [
        ["path", var.apps[name].health.path],
        ["interval", var.apps[name].health.interval],
        ["timeout", var.apps[name].health.timeout],
        ["healthy_threshold", var.apps[name].health.healthy_threshold],
        ["unhealthy_threshold", var.apps[name].health.unhealthy_threshold],
        ["start_period", var.apps[name].health.start_period],
      ] : "${kv[0]} = ${jsonencode(kv[1])}" if kv[1] != null]
    },
    {
      header = "apps.${name}.restart"
      lines = var.apps[name].restart == null ? [] : [for kv in [
        ["initial_backoff", var.apps[name].restart.initial_backoff],
        ["max_backoff", var.apps[name].restart.max_backoff],
      ] : "${kv[0]} = ${jsonencode(kv[1])}" if kv[1] != null]
    },
  ]])

  # Empty sections are left out, except [apps.NAME] which always has image and port.
  sections = [for s in concat(
    [
      { header = "agent", lines = local.agent_lines },
      { header = "aws", lines = local.aws_lines },
      { header = "secrets", lines = local.secrets_lines },
      { header = "http", lines = local.http_lines },
      { header = "https", lines = local.https_lines },
      { header = "tls", lines = local.tls_lines },
      { header = "tls.acme", lines = local.acme_lines },
    ],
    local.app_sections,
  ) : s if length(s.lines) > 0]

  berth_toml = templatefile("${path.module}/templates/berth.toml.tftpl", {
    sections = local.sections
  })

  # --- cloud-config ------------------------------------------------------------------------
  install_script = templatefile("${path.module}/templates/berth-install.sh.tftpl", {
    package_url     = var.package_url
    package_sha256  = var.package_sha256
    package_manager = var.package_manager
    install_docker  = var.install_docker
  })

  cloud_config = templatefile("${path.module}/templates/cloud-config.yaml.tftpl", {
    config_path    = local.config_path
    berth_toml     = chomp(local.berth_toml)
    install_script = chomp(local.install_script)
  })

  # --- IAM -----------------------------------------------------------------------------------
  ssm_arn = "arn:${var.partition}:ssm:${var.region}:${var.account_id}:parameter"

  # GetParametersByPath is authorized against the path in the request (berth sends it without
  # the trailing '/'), GetParameter(s) against each parameter.
  app_path          = var.secrets.path == null ? null : trimsuffix(var.secrets.path, "/")
  path_list_arns    = local.app_path == null ? [] : ["${local.ssm_arn}${local.app_path}", "${local.ssm_arn}${local.app_path}/*"]
  path_read_arns    = local.app_path == null ? [] : ["${local.ssm_arn}${local.app_path}/*"]
  registry_cred_ssm = flatten([for a in values(var.apps) : a.registry_credentials == null ? [] : [a.registry_credentials.username, a.registry_credentials.password]])

  # Named parameters: a plain name, a name with a version/label selector (/x:3), or an ARN.
  named_parameters = concat(var.secrets.parameters, local.registry_cred_ssm)
  named_parameter_arns = [for n in local.named_parameters :
    startswith(n, "arn:") ? replace(n, "/:[^/:]*$/", "") : "${local.ssm_arn}/${trimprefix(replace(n, "/:[^/]*$/", ""), "/")}"
  ]
  read_arns = distinct(concat(local.path_read_arns, local.named_parameter_arns))

  # /aws/reference/secretsmanager/NAME: SSM resolves it with the caller's permissions on the secret.
  sm_prefix = "/aws/reference/secretsmanager/"
  secretsmanager_arns = distinct([for n in var.secrets.parameters :
    "arn:${var.partition}:secretsmanager:${var.region}:${var.account_id}:secret:${replace(trimprefix(n, local.sm_prefix), "/:[^/]*$/", "")}-??????"
    if startswith(n, local.sm_prefix)
  ])

  kms_via_services = concat(
    ["ssm.${var.region}.${var.dns_suffix}"],
    length(local.secretsmanager_arns) > 0 ? ["secretsmanager.${var.region}.${var.dns_suffix}"] : [],
  )

  fleet_prefix      = var.tls.mode == "acme" ? try(var.tls.acme.shared, null) : null
  eab_key_parameter = var.tls.mode == "acme" ? try(var.tls.acme.eab_hmac_key_parameter, null) : null
  fleet_prefix_under_app_path = local.fleet_prefix != null && local.app_path != null && startswith(
    "${local.fleet_prefix == null ? "" : local.fleet_prefix}/",
    "${local.app_path == null ? "" : local.app_path}/",
  )

  # ECR repositories from image references: ACCOUNT.dkr.ecr.REGION.amazonaws.com/REPO[:tag|@digest]
  ecr_image_re = "^([0-9]{12})\\.dkr\\.ecr(?:-fips)?\\.([a-z0-9-]+)\\.amazonaws\\.com(?:\\.cn)?/([^:@]+)"
  ecr_apps     = [for name, a in var.apps : name if a.registry_auth == "ecr" && a.registry_credentials == null]
  ecr_derived_arns = [for name in local.ecr_apps :
    format("arn:%s:ecr:%s:%s:repository/%s", var.partition,
      regex(local.ecr_image_re, var.apps[name].image)[1],
      regex(local.ecr_image_re, var.apps[name].image)[0],
      regex(local.ecr_image_re, var.apps[name].image)[2],
    ) if can(regex(local.ecr_image_re, var.apps[name].image))
  ]
  ecr_repository_arns = distinct(concat(local.ecr_derived_arns, var.ecr_repository_arns))
  ecr_used            = length(local.ecr_apps) > 0 || length(var.ecr_repository_arns) > 0

  # s3://bucket/key; {format} and {arch} become wildcards inside that one key pattern.
  package_s3_arn = startswith(var.package_url, "s3://") ? "arn:${var.partition}:s3:::${replace(replace(trimprefix(var.package_url, "s3://"), "{format}", "*"), "{arch}", "*")}" : null

  statements = concat(
    local.app_path == null ? [] : [{
      Sid      = "ReadAppSecretsByPath"
      Effect   = "Allow"
      Action   = ["ssm:GetParametersByPath"]
      Resource = local.path_list_arns
    }],
    length(local.read_arns) == 0 ? [] : [{
      Sid      = "ReadAppSecrets"
      Effect   = "Allow"
      Action   = ["ssm:GetParameter", "ssm:GetParameters"]
      Resource = local.read_arns
    }],
    length(local.secretsmanager_arns) == 0 ? [] : [{
      Sid      = "ReadReferencedSecrets"
      Effect   = "Allow"
      Action   = ["secretsmanager:GetSecretValue"]
      Resource = local.secretsmanager_arns
    }],
    length(var.kms_key_arns) == 0 ? [] : [{
      Sid      = "DecryptSecretsThroughSsm"
      Effect   = "Allow"
      Action   = ["kms:Decrypt"]
      Resource = var.kms_key_arns
      Condition = {
        StringEquals = { "kms:ViaService" = local.kms_via_services }
      }
    }],
    # Fleet ACME: {prefix}/account, /lock, /key, /cert. Create-only PutParameter for the
    # account and the lock, overwrite for key and chain, DeleteParameter for the lock.
    local.fleet_prefix == null ? [] : [{
      Sid      = "FleetAcmeState"
      Effect   = "Allow"
      Action   = ["ssm:GetParameter", "ssm:PutParameter", "ssm:DeleteParameter"]
      Resource = ["${local.ssm_arn}${local.fleet_prefix}/*"]
    }],
    # The EAB MAC key, read when berth registers its ACME account.
    local.eab_key_parameter == null ? [] : [{
      Sid      = "ReadAcmeEabKey"
      Effect   = "Allow"
      Action   = ["ssm:GetParameter"]
      Resource = ["${local.ssm_arn}${local.eab_key_parameter}"]
    }],
    # GetAuthorizationToken has no resource-level permissions: AWS requires "*" for it.
    local.ecr_used ? [{
      Sid      = "EcrAuthorizationToken"
      Effect   = "Allow"
      Action   = ["ecr:GetAuthorizationToken"]
      Resource = ["*"]
    }] : [],
    local.ecr_used ? [{
      Sid      = "EcrPull"
      Effect   = "Allow"
      Action   = ["ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer"]
      Resource = local.ecr_repository_arns
    }] : [],
    local.package_s3_arn == null ? [] : [{
      Sid      = "DownloadBerthPackage"
      Effect   = "Allow"
      Action   = ["s3:GetObject"]
      Resource = [local.package_s3_arn]
    }],
  )

  iam_policy_json = jsonencode({
    Version   = "2012-10-17"
    Statement = local.statements
  })

  # Session Manager and Run Command without AmazonSSMManagedInstanceCore (whose
  # ssm:GetParameter(s) on "*" would let anything on the instance read every parameter in the
  # account). The ssmmessages / ec2messages actions have no resource-level permissions.
  session_manager_statements = [
    {
      Sid    = "SsmAgentRegistration"
      Effect = "Allow"
      Action = ["ssm:UpdateInstanceInformation"]
      Resource = [
        "arn:${var.partition}:ec2:${var.region}:${var.account_id}:instance/*",
      ]
    },
    {
      Sid      = "SessionManagerChannels"
      Effect   = "Allow"
      Action   = ["ssmmessages:CreateControlChannel", "ssmmessages:CreateDataChannel", "ssmmessages:OpenControlChannel", "ssmmessages:OpenDataChannel"]
      Resource = ["*"]
    },
    {
      # Run Command (e.g. `berth deploy` on every instance, docs/runbook.md).
      Sid      = "RunCommandMessages"
      Effect   = "Allow"
      Action   = ["ec2messages:AcknowledgeMessage", "ec2messages:DeleteMessage", "ec2messages:FailMessage", "ec2messages:GetEndpoint", "ec2messages:GetMessages", "ec2messages:SendReply"]
      Resource = ["*"]
    },
  ]

  session_manager_policy_json = var.session_manager ? jsonencode({
    Version   = "2012-10-17"
    Statement = local.session_manager_statements
  }) : null

  assume_role_policy_json = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Sid       = "Ec2Instances"
      Effect    = "Allow"
      Action    = ["sts:AssumeRole"]
      Principal = { Service = "ec2.${var.dns_suffix}" }
    }]
  })
}
