"""Attribution methods: one module each, registered with `@register_explainer` (imported on first lookup)."""
