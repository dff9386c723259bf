# sft-job on AWS: one KMS key, one S3 bucket (data/ read-only, runs/ read-write for jobs), ECR
# repositories for the images, and an IRSA role that only the job's k8s ServiceAccount can assume.
# The EKS cluster itself is not created here: see terraform/README.md.

data "aws_caller_identity" "current" {}
data "aws_partition" "current" {}

locals {
  account_id  = data.aws_caller_identity.current.account_id
  oidc_issuer = split("oidc-provider/", var.oidc_provider_arn)[1]
  bucket_arn  = "arn:${data.aws_partition.current.partition}:s3:::${var.bucket_name}"
}

# ---------------------------------------------------------------------------------------------
# Encryption key for the bucket and the registry. The key policy delegates to IAM (the account
# root statement), so the role policy below is what grants the job its use of the key.

data "aws_iam_policy_document" "kms" {
  # checkov:skip=CKV_AWS_109: a key policy's Resource "*" means this key; delegating to the account's IAM is the AWS default key policy.
  # checkov:skip=CKV_AWS_111: same: the key policy applies to this key only.
  # checkov:skip=CKV_AWS_356: same: "*" in a key policy is the key itself.
  statement {
    sid       = "AccountAdministersKeyThroughIAM"
    actions   = ["kms:*"]
    resources = ["*"]
    principals {
      type        = "AWS"
      identifiers = ["arn:${data.aws_partition.current.partition}:iam::${local.account_id}:root"]
    }
  }
}

resource "aws_kms_key" "this" {
  description             = "${var.name}: S3 bucket and ECR encryption"
  enable_key_rotation     = true
  deletion_window_in_days = 30
  policy                  = data.aws_iam_policy_document.kms.json
}

resource "aws_kms_alias" "this" {
  name          = "alias/${var.name}"
  target_key_id = aws_kms_key.this.key_id
}

# ---------------------------------------------------------------------------------------------
# The bucket: data/ (datasets, base models) and runs/ (outputs, checkpoints).

#trivy:ignore:AVD-AWS-0089 (same reason as CKV_AWS_18 below: use CloudTrail data events, not a log bucket)
resource "aws_s3_bucket" "this" {
  # checkov:skip=CKV_AWS_18: server access logs need a second bucket; use CloudTrail S3 data events for an audit trail.
  # checkov:skip=CKV_AWS_144: cross-region replication doubles storage cost; runs can be retrained and data re-uploaded.
  # checkov:skip=CKV2_AWS_62: no consumer of bucket event notifications exists; jobs poll for _SUCCESS.
  bucket        = var.bucket_name
  force_destroy = var.force_destroy
}

resource "aws_s3_bucket_ownership_controls" "this" {
  bucket = aws_s3_bucket.this.id
  rule {
    object_ownership = "BucketOwnerEnforced" # no ACLs: access is IAM policy only
  }
}

resource "aws_s3_bucket_public_access_block" "this" {
  bucket                  = aws_s3_bucket.this.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_versioning" "this" {
  bucket = aws_s3_bucket.this.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "this" {
  bucket = aws_s3_bucket.this.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = "aws:kms"
      kms_master_key_id = aws_kms_key.this.arn
    }
    bucket_key_enabled = true # one KMS call per object rather than per request: cheaper, faster
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "this" {
  bucket = aws_s3_bucket.this.id

  # A preempted multipart upload (a large checkpoint shard) leaves billable parts behind.
  rule {
    id     = "abort-incomplete-uploads"
    status = "Enabled"
    filter {}
    abort_incomplete_multipart_upload {
      days_after_initiation = 1
    }
  }

  # Old checkpoints, 1: the trainer rotates checkpoints; with versioning on, a deleted checkpoint
  # lives on as a noncurrent version until this rule expires it.
  rule {
    id     = "expire-noncurrent-versions"
    status = "Enabled"
    filter {}
    noncurrent_version_expiration {
      noncurrent_days = var.checkpoint_noncurrent_days
    }
    expiration {
      expired_object_delete_marker = true
    }
  }

  # Old checkpoints, 2: checkpoints a finished run leaves behind. Checkpoint sync tags checkpoint
  # objects sft-job-kind=checkpoint (only under runs/, the only prefix jobs can write), so models,
  # adapters, metrics and data are never expired.
  rule {
    id     = "expire-old-checkpoints"
    status = "Enabled"
    filter {
      tag {
        key   = "sft-job-kind"
        value = "checkpoint"
      }
    }
    expiration {
      days = var.checkpoint_expire_days
    }
  }

  depends_on = [aws_s3_bucket_versioning.this]
}

data "aws_iam_policy_document" "bucket" {
  statement {
    sid       = "DenyInsecureTransport"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [local.bucket_arn, "${local.bucket_arn}/*"]
    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}

resource "aws_s3_bucket_policy" "this" {
  bucket     = aws_s3_bucket.this.id
  policy     = data.aws_iam_policy_document.bucket.json
  depends_on = [aws_s3_bucket_public_access_block.this]
}

# ---------------------------------------------------------------------------------------------
# IRSA: the job's pods (ServiceAccount k8s_namespace/k8s_service_account, annotated with
# eks.amazonaws.com/role-arn) get this role and nothing else can assume it.

data "aws_iam_policy_document" "assume" {
  statement {
    actions = ["sts:AssumeRoleWithWebIdentity"]
    principals {
      type        = "Federated"
      identifiers = [var.oidc_provider_arn]
    }
    condition {
      test     = "StringEquals"
      variable = "${local.oidc_issuer}:sub"
      values   = ["system:serviceaccount:${var.k8s_namespace}:${var.k8s_service_account}"]
    }
    condition {
      test     = "StringEquals"
      variable = "${local.oidc_issuer}:aud"
      values   = ["sts.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "job" {
  name                 = "${var.name}-job"
  description          = "sft-job training pods (IRSA)"
  assume_role_policy   = data.aws_iam_policy_document.assume.json
  max_session_duration = 43200 # a training run outlives the default 1 h; the SDK refreshes anyway
}

# Least privilege: list the bucket, read data/, read+write+delete runs/ (resume, checkpoint
# rotation, multipart uploads, the checkpoint tag), and use the key for those objects only.
data "aws_iam_policy_document" "job" {
  statement {
    sid       = "ListBucket"
    actions   = ["s3:ListBucket"] # also authorizes HeadBucket, which carries no s3:prefix
    resources = [local.bucket_arn]
  }
  statement {
    sid       = "ReadData"
    actions   = ["s3:GetObject"]
    resources = ["${local.bucket_arn}/${var.data_prefix}*"]
  }
  statement {
    sid = "ReadWriteRuns"
    actions = [
      "s3:GetObject",
      "s3:PutObject",
      "s3:PutObjectTagging",
      "s3:DeleteObject",
      "s3:AbortMultipartUpload",
      "s3:ListMultipartUploadParts",
    ]
    resources = ["${local.bucket_arn}/${var.runs_prefix}*"]
  }
  statement {
    sid       = "UseBucketKey"
    actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
    resources = [aws_kms_key.this.arn]
    condition {
      test     = "StringEquals"
      variable = "kms:ViaService"
      values   = ["s3.${var.region}.amazonaws.com"]
    }
  }
}

resource "aws_iam_policy" "job" {
  name        = "${var.name}-job"
  description = "sft-job pods: read ${var.data_prefix}, read/write ${var.runs_prefix} in ${var.bucket_name}"
  policy      = data.aws_iam_policy_document.job.json
}

resource "aws_iam_role_policy_attachment" "job" {
  role       = aws_iam_role.job.name
  policy_arn = aws_iam_policy.job.arn
}

# ---------------------------------------------------------------------------------------------
# ECR: <account>.dkr.ecr.<region>.amazonaws.com/<name>/sft-job-{cuda,cpu}:<TAG>

resource "aws_ecr_repository" "images" {
  for_each = var.images

  name                 = "${var.name}/${each.value}"
  image_tag_mutability = "IMMUTABLE" # a tag names one image forever: reruns get the same bits
  force_delete         = var.force_destroy

  image_scanning_configuration {
    scan_on_push = true
  }
  encryption_configuration {
    encryption_type = "KMS"
    kms_key         = aws_kms_key.this.arn
  }
}

resource "aws_ecr_lifecycle_policy" "images" {
  for_each = aws_ecr_repository.images

  repository = each.value.name
  policy = jsonencode({
    rules = [
      {
        rulePriority = 1
        description  = "Expire untagged images after 7 days"
        selection    = { tagStatus = "untagged", countType = "sinceImagePushed", countUnit = "days", countNumber = 7 }
        action       = { type = "expire" }
      },
      {
        rulePriority = 2
        description  = "Keep the 30 most recent images"
        selection    = { tagStatus = "any", countType = "imageCountMoreThan", countNumber = 30 }
        action       = { type = "expire" }
      },
    ]
  })
}
