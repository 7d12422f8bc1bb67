[Variant("paper"), Variant("item bias", row="bias"), Variant("item bias serve L=5", row="bias", serve={"meta.inner_steps": 5})]
