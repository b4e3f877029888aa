"""Generated package for proto package dpgan. DO NOT EDIT."""
