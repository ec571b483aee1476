"""See shared/DESIGN.md section 2 for what belongs here."""
