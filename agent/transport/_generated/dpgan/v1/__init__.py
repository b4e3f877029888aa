"""Generated package for proto package dpgan.v1. DO NOT EDIT."""
