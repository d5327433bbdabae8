output "arn" {
  description = "The ALB."
  value       = aws_lb.this.arn
}

output "arn_suffix" {
  description = "The ALB's ARN suffix (CloudWatch dimension, ALBRequestCountPerTarget resource label)."
  value       = aws_lb.this.arn_suffix
}

output "dns_name" {
  description = "The ALB's DNS name."
  value       = aws_lb.this.dns_name
}

output "zone_id" {
  description = "The ALB's hosted zone (for alias records elsewhere)."
  value       = aws_lb.this.zone_id
}

output "security_group_id" {
  description = "The ALB's security group: allow it into the instances on the target ports."
  value       = aws_security_group.alb.id
}

output "target_group_arns" {
  description = "Both target groups, for the Auto Scaling group."
  value       = [aws_lb_target_group.http.arn, aws_lb_target_group.https.arn]
}

output "http_target_group_arn" {
  description = "Target group of the instances' :80."
  value       = aws_lb_target_group.http.arn
}

output "https_target_group_arn" {
  description = "Target group of the instances' :443."
  value       = aws_lb_target_group.https.arn
}

output "https_target_group_arn_suffix" {
  description = "ARN suffix of the :443 target group (ALBRequestCountPerTarget resource label)."
  value       = aws_lb_target_group.https.arn_suffix
}

output "request_count_resource_label" {
  description = "The resource label of ALBRequestCountPerTarget for the :443 target group."
  value       = "${aws_lb.this.arn_suffix}/${aws_lb_target_group.https.arn_suffix}"
}

output "fqdns" {
  description = "Names that point at the ALB."
  value       = [for r in aws_route53_record.alias : r.fqdn]
}
