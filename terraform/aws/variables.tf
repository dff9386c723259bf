variable "region" {
  type        = string
  default     = "us-east-1"
  description = "AWS region of the bucket, the registry and the KMS key (put them next to the EKS cluster)."
}

variable "name" {
  type        = string
  default     = "sft-job"
  description = "Prefix for resource names: ECR repositories <name>/sft-job-{cuda,cpu}, IAM role and policy, KMS alias."

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,30}[a-z0-9]$", var.name))
    error_message = "name must be 3-32 characters: lowercase letters, digits and hyphens, starting with a letter."
  }
}

variable "bucket_name" {
  type        = string
  description = "Globally unique S3 bucket for data (prefix data/) and runs (prefix runs/)."

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", var.bucket_name)) && !strcontains(var.bucket_name, "..")
    error_message = "bucket_name must be a valid S3 bucket name (3-63 lowercase letters, digits, dots, hyphens)."
  }
}

variable "data_prefix" {
  type        = string
  default     = "data/"
  description = "Key prefix of datasets and base models. Jobs may only read it."

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9_.-]*/$", var.data_prefix))
    error_message = "data_prefix must be a simple key prefix ending in /, e.g. data/."
  }
}

variable "runs_prefix" {
  type        = string
  default     = "runs/"
  description = "Key prefix of job outputs and checkpoints. Jobs may read, write and delete under it."

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9_.-]*/$", var.runs_prefix))
    error_message = "runs_prefix must be a simple key prefix ending in /, e.g. runs/."
  }
}

variable "oidc_provider_arn" {
  type        = string
  description = "IAM OIDC provider of the EKS cluster the jobs run in (IRSA), e.g. arn:aws:iam::123456789012:oidc-provider/oidc.eks.us-east-1.amazonaws.com/id/EXAMPLE. Find it with `aws eks describe-cluster --query cluster.identity.oidc.issuer`."

  validation {
    condition     = can(regex("^arn:aws[a-z-]*:iam::[0-9]{12}:oidc-provider/.+", var.oidc_provider_arn))
    error_message = "oidc_provider_arn must be an IAM OIDC provider ARN (arn:aws:iam::<account>:oidc-provider/<issuer>)."
  }
}

variable "k8s_namespace" {
  type        = string
  default     = "sft-job"
  description = "Kubernetes namespace of the job pods (must match k8s/)."
}

variable "k8s_service_account" {
  type        = string
  default     = "sft-job"
  description = "Kubernetes ServiceAccount of the job pods (must match k8s/); only it may assume the role."
}

variable "images" {
  type        = set(string)
  default     = ["sft-job-cuda", "sft-job-cpu"]
  description = "Image names that get an ECR repository <name>/<image>. The TPU image has no use on AWS."
}

variable "checkpoint_noncurrent_days" {
  type        = number
  default     = 7
  description = "Days a deleted or overwritten object (a rotated-out checkpoint, since the bucket is versioned) is kept before it is expired for good."

  validation {
    condition     = var.checkpoint_noncurrent_days >= 1
    error_message = "checkpoint_noncurrent_days must be at least 1."
  }
}

variable "checkpoint_expire_days" {
  type        = number
  default     = 30
  description = "Days after which objects tagged sft-job-kind=checkpoint (set by checkpoint sync) expire: old checkpoints of finished runs go, models and metrics stay."

  validation {
    condition     = var.checkpoint_expire_days >= 1
    error_message = "checkpoint_expire_days must be at least 1."
  }
}

variable "force_destroy" {
  type        = bool
  default     = false
  description = "Let `terraform destroy` delete a non-empty bucket and repositories. Leave false outside tests."
}

variable "tags" {
  type        = map(string)
  default     = { app = "sft-job", managed-by = "terraform" }
  description = "Tags on every resource (cost reports group by these)."
}
