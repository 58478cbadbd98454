"""bootrules: rules.yaml in, iPXE scripts out."""
