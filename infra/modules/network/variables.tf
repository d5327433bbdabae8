variable "name" {
  description = "Name prefix for every resource (and the Name tag)."
  type        = string
}

variable "cidr_block" {
  description = "The VPC's IPv4 range. Public subnets take the first /20s, private subnets start at the ninth."
  type        = string
  default     = "10.20.0.0/16"

  validation {
    condition     = can(cidrhost(var.cidr_block, 0)) && tonumber(split("/", var.cidr_block)[1]) <= 20
    error_message = "cidr_block must be an IPv4 CIDR of /20 or larger (it is cut into /24-or-larger subnets)."
  }
}

variable "az_count" {
  description = "How many availability zones to spread over (2 is the minimum an ALB accepts)."
  type        = number
  default     = 2

  validation {
    condition     = var.az_count >= 2 && var.az_count <= 4
    error_message = "az_count must be 2 to 4."
  }
}

variable "availability_zones" {
  description = "Explicit zone names; empty: the first az_count available zones of the region."
  type        = list(string)
  default     = []
}

variable "nat_gateways" {
  description = <<-EOT
    Internet egress for the private subnets: "single" (one NAT gateway, cheapest), "per-az" (one per zone, survives a zone outage) or "none" (only VPC endpoints: then berth needs tls.mode = "self-signed" or "files", images from ECR, and the package from S3 or the AMI; ACME CAs, Docker Hub and apt mirrors are on the Internet).
  EOT
  type        = string
  default     = "single"

  validation {
    condition     = contains(["single", "per-az", "none"], var.nat_gateways)
    error_message = "nat_gateways must be \"single\", \"per-az\" or \"none\"."
  }
}

variable "interface_endpoints" {
  description = <<-EOT
    Interface VPC endpoints to create in the private subnets, with private DNS (berth then needs no [aws] endpoint_url). Short service names:
    ssm (secrets, fleet ACME state), kms (SecureString decryption happens inside SSM, so only for other KMS use), ecr.api + ecr.dkr (image pulls, with the S3 gateway for layers),
    secretsmanager (not needed for /aws/reference parameters: SSM resolves those), ssmmessages + ec2messages (Session Manager), logs, sts.
    With a NAT gateway they are optional (they keep AWS API traffic off the NAT and its per-GB charge); without one, ssm is required.
  EOT
  type        = list(string)
  default     = []

  validation {
    condition = alltrue([for s in var.interface_endpoints : contains(
      ["ssm", "ssmmessages", "ec2messages", "kms", "ecr.api", "ecr.dkr", "secretsmanager", "logs", "sts"], s
    )])
    error_message = "interface_endpoints may contain: ssm, ssmmessages, ec2messages, kms, ecr.api, ecr.dkr, secretsmanager, logs, sts."
  }
}

variable "s3_gateway_endpoint" {
  description = "Create the (free) S3 gateway endpoint on the private route tables: ECR image layers, the berth package from S3, Amazon Linux 2023's dnf repositories."
  type        = bool
  default     = true
}

variable "tags" {
  description = "Tags for every resource."
  type        = map(string)
  default     = {}
}
