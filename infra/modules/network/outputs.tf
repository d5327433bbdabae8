output "vpc_id" {
  description = "The VPC."
  value       = aws_vpc.this.id
}

output "vpc_cidr_block" {
  description = "The VPC's IPv4 range."
  value       = aws_vpc.this.cidr_block
}

output "availability_zones" {
  description = "Zones the subnets are in, in subnet order."
  value       = local.azs
}

output "public_subnet_ids" {
  description = "Public subnets (the ALB)."
  value       = aws_subnet.public[*].id
}

output "private_subnet_ids" {
  description = "Private subnets (the berth instances)."
  value       = aws_subnet.private[*].id
}

output "private_route_table_ids" {
  description = "Route tables of the private subnets."
  value       = aws_route_table.private[*].id
}

output "nat_public_ips" {
  description = "Addresses the instances' Internet traffic leaves from (allow-list these at third parties)."
  value       = aws_eip.nat[*].public_ip
}

output "interface_endpoint_ids" {
  description = "Interface endpoints by short service name."
  value       = { for k, e in aws_vpc_endpoint.interface : k => e.id }
}

output "has_internet_egress" {
  description = "Whether the private subnets reach the Internet (ACME CAs, Docker Hub, apt mirrors)."
  value       = local.nat_count > 0
}
