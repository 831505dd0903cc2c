"""Tasks: what differs between translation, language modelling and vision -- data, loss, validation."""
