terraform {
  required_version = ">= 1.9"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "~> 5.100"
    }
  }

  # State stays local unless you add a backend, e.g. in backend.tf (not committed):
  #   terraform { backend "s3" { bucket = "my-tf-state" key = "sft-job/aws.tfstate" region = "us-east-1" } }
}

provider "aws" {
  region = var.region

  default_tags {
    tags = var.tags
  }
}
