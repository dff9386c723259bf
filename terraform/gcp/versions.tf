terraform {
  required_version = ">= 1.9"

  required_providers {
    google = {
      source  = "hashicorp/google"
      version = "~> 6.40"
    }
  }

  # State stays local unless you add a backend, e.g. in backend.tf (not committed):
  #   terraform { backend "gcs" { bucket = "my-tf-state" prefix = "sft-job/gcp" } }
}

provider "google" {
  project        = var.project_id
  region         = var.region
  default_labels = var.labels
}
