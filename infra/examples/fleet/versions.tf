terraform {
  required_version = ">= 1.5.0"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.40, < 7.0"
    }
  }

  # Keep state remote and encrypted (it holds the SSM placeholders' values and resource IDs):
  # backend "s3" {
  #   bucket       = "my-terraform-state"
  #   key          = "berth/myapp-prod.tfstate"
  #   region       = "eu-west-1"
  #   encrypt      = true
  #   use_lockfile = true
  # }
}

provider "aws" {
  region = var.region

  default_tags {
    tags = merge({ "berth:app" = var.name, "berth:environment" = var.environment }, var.tags)
  }
}
