"""Rendering: tables, plots and the HTML report built from analysis results."""
