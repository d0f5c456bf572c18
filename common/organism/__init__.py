"""The built-in model organism: a tiny Llama that the project trains, with SAEs and a planted cause (README.md)."""
