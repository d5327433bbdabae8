variable "name" {
  description = "Name of the load balancer; target groups get \"-http\" / \"-https\" (ALB and target group names are at most 32 characters)."
  type        = string

  validation {
    condition     = can(regex("^[A-Za-z0-9][A-Za-z0-9-]{0,25}$", var.name))
    error_message = "name must be 1 to 26 letters, digits or '-', so the target group names fit in 32 characters."
  }
}

variable "vpc_id" {
  description = "The VPC."
  type        = string
}

variable "vpc_cidr_block" {
  description = "The VPC's range: the ALB may open connections to targets in it on the target ports."
  type        = string
}

variable "subnet_ids" {
  description = "Public subnets in at least two zones (private ones with internal = true)."
  type        = list(string)
}

variable "internal" {
  description = "An internal ALB (no public addresses)."
  type        = bool
  default     = false
}

variable "ingress_cidr_blocks" {
  description = "Who may connect to :80 and :443."
  type        = list(string)
  default     = ["0.0.0.0/0"]
}

variable "certificate_arn" {
  description = "ACM certificate for the :443 listener."
  type        = string
}

variable "additional_certificate_arns" {
  description = "More ACM certificates for the :443 listener (SNI)."
  type        = list(string)
  default     = []
}

variable "ssl_policy" {
  description = "TLS policy of the :443 listener."
  type        = string
  default     = "ELBSecurityPolicy-TLS13-1-2-2021-06"
}

variable "http_port" {
  description = "berth's :80 listener port on the instances (http.listen)."
  type        = number
  default     = 80
}

variable "https_port" {
  description = "berth's :443 listener port on the instances (https.listen)."
  type        = number
  default     = 443
}

variable "health_path" {
  description = "berth's http.health_path: 200 when every app is healthy and berth is not draining, else 503."
  type        = string
  default     = "/_berth/health"
}

variable "health_check_interval" {
  description = "Seconds between health checks. With unhealthy_threshold it must fit in berth's drain_delay, or the ALB keeps sending requests to an instance that is already closing its listeners."
  type        = number
  default     = 5
}

variable "health_check_timeout" {
  description = "Seconds a health check may take (less than the interval)."
  type        = number
  default     = 3
}

variable "healthy_threshold" {
  description = "Consecutive successes before a target receives traffic."
  type        = number
  default     = 2
}

variable "unhealthy_threshold" {
  description = "Consecutive failures before a target stops receiving traffic."
  type        = number
  default     = 2
}

variable "deregistration_delay" {
  description = "Seconds the ALB drains a deregistering target: set it to berth's agent.drain_delay (module berth-config, output drain_delay_seconds)."
  type        = number

  validation {
    condition     = var.deregistration_delay >= 0 && var.deregistration_delay <= 3600
    error_message = "deregistration_delay must be 0 to 3600 seconds."
  }
}

variable "target_protocol_version" {
  description = "Protocol from the ALB to berth's :443: HTTP1 or HTTP2 (berth speaks both; HTTP2 multiplexes over fewer connections)."
  type        = string
  default     = "HTTP1"

  validation {
    condition     = contains(["HTTP1", "HTTP2"], var.target_protocol_version)
    error_message = "target_protocol_version must be HTTP1 or HTTP2."
  }
}

variable "idle_timeout" {
  description = "ALB idle timeout in seconds. Keep it below berth's idle timeout towards the ALB so the ALB closes idle connections first."
  type        = number
  default     = 60
}

variable "deletion_protection" {
  description = "Refuse to delete the ALB until this is turned off."
  type        = bool
  default     = false
}

variable "access_logs_bucket" {
  description = "S3 bucket for ALB access logs; null: off."
  type        = string
  default     = null
}

variable "route53_zone_id" {
  description = "Hosted zone for the alias records; null: no records."
  type        = string
  default     = null
}

variable "dns_names" {
  description = "Names (in route53_zone_id) that get A alias records to the ALB, typically berth's tls.domains."
  type        = list(string)
  default     = []
}

variable "tags" {
  description = "Tags for every resource."
  type        = map(string)
  default     = {}
}
