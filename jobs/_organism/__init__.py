"""The built-in model organism's making: its synthetic text, decision rule, training and measurement
(README.md). Its loader and shipped files are common.organism's, so every job can load it."""
