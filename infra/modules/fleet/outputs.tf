output "autoscaling_group_name" {
  description = "The Auto Scaling group (for `aws autoscaling start-instance-refresh`)."
  value       = aws_autoscaling_group.this.name
}

output "autoscaling_group_arn" {
  description = "The Auto Scaling group's ARN."
  value       = aws_autoscaling_group.this.arn
}

output "launch_template_id" {
  description = "The launch template."
  value       = aws_launch_template.this.id
}

output "launch_template_version" {
  description = "The launch template version the group runs."
  value       = aws_launch_template.this.latest_version
}

output "role_name" {
  description = "The instance role."
  value       = aws_iam_role.this.name
}

output "role_arn" {
  description = "The instance role's ARN (for KMS key policies, bucket policies)."
  value       = aws_iam_role.this.arn
}

output "instance_profile_arn" {
  description = "The instance profile."
  value       = aws_iam_instance_profile.this.arn
}

output "security_group_id" {
  description = "The instances' security group."
  value       = aws_security_group.instances.id
}
