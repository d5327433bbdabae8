# The berth instances: an instance profile with berth's least-privilege policy, a launch
# template whose user data installs and starts berth, and an Auto Scaling group across the
# private subnets behind the ALB's target groups, with instance refresh and a termination
# lifecycle hook.

locals {
  tags = merge({ "berth:fleet" = var.name }, var.tags)
}

data "aws_ami" "selected" {
  filter {
    name   = "image-id"
    values = [var.ami_id]
  }
}

# --- IAM ------------------------------------------------------------------------------------------

resource "aws_iam_role" "this" {
  name_prefix          = "${substr(var.name, 0, 32)}-"
  description          = "berth instances of ${var.name}"
  assume_role_policy   = var.assume_role_policy_json
  permissions_boundary = var.permissions_boundary_arn
  tags                 = local.tags
}

resource "aws_iam_role_policy" "berth" {
  count = var.attach_berth_policy ? 1 : 0

  name   = "berth"
  role   = aws_iam_role.this.id
  policy = var.berth_policy_json
}

resource "aws_iam_role_policy" "additional" {
  for_each = var.additional_policy_jsons

  name   = each.key
  role   = aws_iam_role.this.id
  policy = each.value
}

resource "aws_iam_instance_profile" "this" {
  name_prefix = "${substr(var.name, 0, 32)}-"
  role        = aws_iam_role.this.name
  tags        = local.tags
}

# --- security group ------------------------------------------------------------------------------

resource "aws_security_group" "instances" {
  name_prefix = "${var.name}-instances-"
  description = "berth instances: berth's ports from the ALB only"
  vpc_id      = var.vpc_id
  tags        = merge(local.tags, { Name = "${var.name}-instances" })

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_vpc_security_group_ingress_rule" "from_alb" {
  for_each = toset(distinct([tostring(var.http_port), tostring(var.https_port)]))

  security_group_id            = aws_security_group.instances.id
  description                  = "berth port ${each.key} from the ALB"
  ip_protocol                  = "tcp"
  from_port                    = tonumber(each.key)
  to_port                      = tonumber(each.key)
  referenced_security_group_id = var.alb_security_group_id
}

resource "aws_vpc_security_group_egress_rule" "out" {
  for_each = { for pair in setproduct(["80", "443"], var.egress_cidr_blocks) : "${pair[0]}-${pair[1]}" => pair }

  security_group_id = aws_security_group.instances.id
  description       = each.value[0] == "443" ? "HTTPS: AWS APIs, registries, ACME" : "HTTP: package mirrors"
  ip_protocol       = "tcp"
  from_port         = tonumber(each.value[0])
  to_port           = tonumber(each.value[0])
  cidr_ipv4         = strcontains(each.value[1], ":") ? null : each.value[1]
  cidr_ipv6         = strcontains(each.value[1], ":") ? each.value[1] : null
}

# --- launch template ----------------------------------------------------------------------------

resource "aws_launch_template" "this" {
  name_prefix            = "${var.name}-"
  description            = "berth instances of ${var.name}"
  image_id               = var.ami_id
  instance_type          = var.instance_type
  key_name               = var.key_name
  user_data              = var.user_data_base64
  update_default_version = true
  vpc_security_group_ids = concat([aws_security_group.instances.id], var.additional_security_group_ids)

  iam_instance_profile {
    arn = aws_iam_instance_profile.this.arn
  }

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required" # IMDSv2 only
    http_put_response_hop_limit = var.metadata_hop_limit
    instance_metadata_tags      = "disabled"
  }

  block_device_mappings {
    device_name = data.aws_ami.selected.root_device_name

    ebs {
      volume_size           = var.root_volume_size
      volume_type           = "gp3"
      encrypted             = true
      kms_key_id            = var.root_volume_kms_key_id
      delete_on_termination = true
    }
  }

  monitoring {
    enabled = true
  }

  tag_specifications {
    resource_type = "instance"
    tags          = merge(local.tags, { Name = var.name })
  }

  tag_specifications {
    resource_type = "volume"
    tags          = merge(local.tags, { Name = var.name })
  }

  tags = local.tags
}

# --- Auto Scaling group -------------------------------------------------------------------------

resource "aws_autoscaling_group" "this" {
  name                      = var.name
  vpc_zone_identifier       = var.subnet_ids
  min_size                  = var.min_size
  max_size                  = var.max_size
  desired_capacity          = var.desired_capacity
  target_group_arns         = var.target_group_arns
  health_check_type         = "ELB" # berth's health path, not just "the VM is up"
  health_check_grace_period = var.health_check_grace_period
  default_instance_warmup   = var.instance_warmup
  wait_for_capacity_timeout = "15m"
  enabled_metrics           = ["GroupDesiredCapacity", "GroupInServiceInstances", "GroupPendingInstances", "GroupTerminatingInstances", "GroupTotalInstances"]

  launch_template {
    id      = aws_launch_template.this.id
    version = aws_launch_template.this.latest_version
  }

  # A new launch template version (new AMI, new berth.toml, new package) rolls the group:
  # replacements launch first and must pass the ALB health check before old ones leave.
  instance_refresh {
    strategy = "Rolling"
    preferences {
      min_healthy_percentage = var.refresh_min_healthy_percentage
      max_healthy_percentage = var.refresh_max_healthy_percentage
      instance_warmup        = var.instance_warmup
    }
  }

  dynamic "tag" {
    for_each = merge(local.tags, { Name = var.name })
    content {
      key                 = tag.key
      value               = tag.value
      propagate_at_launch = true
    }
  }

  lifecycle {
    ignore_changes = [desired_capacity]

    precondition {
      condition     = var.min_size <= var.desired_capacity && var.desired_capacity <= var.max_size
      error_message = "desired_capacity must be between min_size and max_size."
    }
  }
}

# Scale-in and instance refresh: the Auto Scaling group first deregisters the instance from
# the target groups (the ALB drains it for deregistration_delay = drain_delay), then this hook
# holds it in Terminating:Wait so in-flight work (a long request, a fleet ACME order holding
# the lock) can finish before shutdown sends berth SIGTERM. Nothing has to complete the hook:
# it times out and continues.
resource "aws_autoscaling_lifecycle_hook" "drain" {
  count = var.termination_hook ? 1 : 0

  name                   = "berth-drain"
  autoscaling_group_name = aws_autoscaling_group.this.name
  lifecycle_transition   = "autoscaling:EC2_INSTANCE_TERMINATING"
  heartbeat_timeout      = max(30, var.drain_delay_seconds + var.drain_timeout_seconds)
  default_result         = "CONTINUE"
}

resource "aws_autoscaling_policy" "requests_per_target" {
  count = var.request_count_per_target == null ? 0 : 1

  name                      = "${var.name}-requests-per-target"
  autoscaling_group_name    = aws_autoscaling_group.this.name
  policy_type               = "TargetTrackingScaling"
  estimated_instance_warmup = var.instance_warmup

  target_tracking_configuration {
    target_value = var.request_count_per_target

    predefined_metric_specification {
      predefined_metric_type = "ALBRequestCountPerTarget"
      resource_label         = var.request_count_resource_label
    }
  }

  lifecycle {
    precondition {
      condition     = var.request_count_resource_label != null
      error_message = "request_count_per_target needs request_count_resource_label (module alb, output request_count_resource_label)."
    }
  }
}
