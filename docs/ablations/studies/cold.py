[Variant("paper"), Variant("cold tasks p0", row="cold")]
