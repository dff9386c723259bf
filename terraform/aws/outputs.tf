locals {
  # <account>.dkr.ecr.<region>.amazonaws.com/<name>: images are <registry>/sft-job-{cuda,cpu}:<TAG>.
  registry = regex("^(.+)/[^/]+$", values(aws_ecr_repository.images)[0].repository_url)[0]
}

output "bucket" {
  description = "S3 bucket name."
  value       = aws_s3_bucket.this.bucket
}

output "data_uri" {
  description = "Where datasets and base models go (jobs read it)."
  value       = "s3://${aws_s3_bucket.this.bucket}/${var.data_prefix}"
}

output "runs_uri" {
  description = "Where job outputs and checkpoints go (jobs write it)."
  value       = "s3://${aws_s3_bucket.this.bucket}/${var.runs_prefix}"
}

output "role_arn" {
  description = "IRSA role: annotate the k8s ServiceAccount with eks.amazonaws.com/role-arn=<this>."
  value       = aws_iam_role.job.arn
}

output "registry" {
  description = "Image registry path: push <registry>/sft-job-{cuda,cpu}:<TAG>."
  value       = local.registry
}

output "kms_key_arn" {
  description = "KMS key that encrypts the bucket and the repositories."
  value       = aws_kms_key.this.arn
}

output "settings" {
  description = "KEY => value lines `make tf-settings CLOUD=aws` writes into cluster.local.env, the settings file of `make submit-*` (mk/cluster.mk, cluster.env)."
  value = {
    REGISTRY     = local.registry
    AWS_ROLE_ARN = aws_iam_role.job.arn
    DATA_BUCKET  = "s3://${aws_s3_bucket.this.bucket}/${var.data_prefix}"
    RUNS_BUCKET  = "s3://${aws_s3_bucket.this.bucket}/${var.runs_prefix}"
  }
}
