# The ALB in front of the berth instances:
#   :80  -> instances :80  (berth answers ACME HTTP-01 there, and redirects the rest to https)
#   :443 -> instances :443 over HTTPS (berth terminates TLS again; the ALB does not verify
#           the target's certificate, so berth's self-signed one is enough)
# Both target groups check berth's health path on the instances' :80 and drain for
# deregistration_delay = berth's drain_delay.

locals {
  tags = merge({ "berth:alb" = var.name }, var.tags)

  health_check = {
    path                = var.health_path
    port                = tostring(var.http_port)
    protocol            = "HTTP"
    matcher             = "200"
    interval            = var.health_check_interval
    timeout             = var.health_check_timeout
    healthy_threshold   = var.healthy_threshold
    unhealthy_threshold = var.unhealthy_threshold
  }
}

resource "aws_security_group" "alb" {
  name_prefix = "${var.name}-alb-"
  description = "berth ALB: HTTP and HTTPS from clients, to the instances"
  vpc_id      = var.vpc_id
  tags        = merge(local.tags, { Name = "${var.name}-alb" })

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_vpc_security_group_ingress_rule" "alb" {
  for_each = { for pair in setproduct(["80", "443"], var.ingress_cidr_blocks) : "${pair[0]}-${pair[1]}" => pair }

  security_group_id = aws_security_group.alb.id
  description       = "Clients on ${each.value[0]}"
  ip_protocol       = "tcp"
  from_port         = tonumber(each.value[0])
  to_port           = tonumber(each.value[0])
  cidr_ipv4         = strcontains(each.value[1], ":") ? null : each.value[1]
  cidr_ipv6         = strcontains(each.value[1], ":") ? each.value[1] : null
}

resource "aws_vpc_security_group_egress_rule" "alb_to_targets" {
  for_each = toset(distinct([tostring(var.http_port), tostring(var.https_port)]))

  security_group_id = aws_security_group.alb.id
  description       = "berth on the instances, port ${each.key}"
  ip_protocol       = "tcp"
  from_port         = tonumber(each.key)
  to_port           = tonumber(each.key)
  cidr_ipv4         = var.vpc_cidr_block
}

resource "aws_lb" "this" {
  name                       = var.name
  load_balancer_type         = "application"
  internal                   = var.internal
  subnets                    = var.subnet_ids
  security_groups            = [aws_security_group.alb.id]
  idle_timeout               = var.idle_timeout
  drop_invalid_header_fields = true
  enable_deletion_protection = var.deletion_protection

  dynamic "access_logs" {
    for_each = var.access_logs_bucket == null ? [] : [var.access_logs_bucket]
    content {
      bucket  = access_logs.value
      prefix  = var.name
      enabled = true
    }
  }

  tags = merge(local.tags, { Name = var.name })
}

resource "aws_lb_target_group" "http" {
  name                 = "${var.name}-http"
  vpc_id               = var.vpc_id
  target_type          = "instance"
  protocol             = "HTTP"
  port                 = var.http_port
  deregistration_delay = var.deregistration_delay

  health_check {
    enabled             = true
    path                = local.health_check.path
    port                = local.health_check.port
    protocol            = local.health_check.protocol
    matcher             = local.health_check.matcher
    interval            = local.health_check.interval
    timeout             = local.health_check.timeout
    healthy_threshold   = local.health_check.healthy_threshold
    unhealthy_threshold = local.health_check.unhealthy_threshold
  }

  tags = merge(local.tags, { Name = "${var.name}-http" })

  lifecycle {
    precondition {
      condition     = var.health_check_interval * var.unhealthy_threshold <= var.deregistration_delay || var.deregistration_delay == 0
      error_message = "health_check_interval x unhealthy_threshold must not exceed deregistration_delay (berth's drain_delay): on `systemctl stop berth` the ALB must see the 503 before berth closes its listeners."
    }
    precondition {
      condition     = var.health_check_timeout < var.health_check_interval
      error_message = "health_check_timeout must be less than health_check_interval."
    }
  }
}

resource "aws_lb_target_group" "https" {
  name                 = "${var.name}-https"
  vpc_id               = var.vpc_id
  target_type          = "instance"
  protocol             = "HTTPS"
  protocol_version     = var.target_protocol_version
  port                 = var.https_port
  deregistration_delay = var.deregistration_delay

  health_check {
    enabled             = true
    path                = local.health_check.path
    port                = local.health_check.port
    protocol            = local.health_check.protocol
    matcher             = local.health_check.matcher
    interval            = local.health_check.interval
    timeout             = local.health_check.timeout
    healthy_threshold   = local.health_check.healthy_threshold
    unhealthy_threshold = local.health_check.unhealthy_threshold
  }

  tags = merge(local.tags, { Name = "${var.name}-https" })
}

# :80 forwards everything, not just /.well-known/acme-challenge/: berth answers the challenge
# (statelessly, on any instance, in fleet mode), health, and redirects the rest to https.
resource "aws_lb_listener" "http" {
  load_balancer_arn = aws_lb.this.arn
  port              = 80
  protocol          = "HTTP"

  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.http.arn
  }

  tags = local.tags
}

resource "aws_lb_listener" "https" {
  load_balancer_arn = aws_lb.this.arn
  port              = 443
  protocol          = "HTTPS"
  ssl_policy        = var.ssl_policy
  certificate_arn   = var.certificate_arn

  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.https.arn
  }

  tags = local.tags
}

resource "aws_lb_listener_certificate" "additional" {
  for_each = toset(var.additional_certificate_arns)

  listener_arn    = aws_lb_listener.https.arn
  certificate_arn = each.value
}

resource "aws_route53_record" "alias" {
  for_each = var.route53_zone_id == null ? toset([]) : toset(var.dns_names)

  zone_id = var.route53_zone_id
  name    = each.value
  type    = "A"

  alias {
    name                   = aws_lb.this.dns_name
    zone_id                = aws_lb.this.zone_id
    evaluate_target_health = true
  }
}
