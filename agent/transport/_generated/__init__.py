"""Code generated from proto/ by scripts/gen_proto.py. DO NOT EDIT."""
