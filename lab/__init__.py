"""The lab: what runs, measures and reports experiments with the layer (see README "Files")."""
