"""The projected path: operators fitted from the store's rows in its (projected) space, saved in the store."""
