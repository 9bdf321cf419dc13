"""report.html: the samples beside their prompts (page.py), what every stage did (run_section.py), the evaluation's figures and their charts.
"""
