[Variant("L=2 (default)"), Variant("serve L=0", serve={"meta.inner_steps": 0}), Variant("serve L=1", serve={"meta.inner_steps": 1}),
 Variant("serve L=3", serve={"meta.inner_steps": 3}), Variant("serve L=5", serve={"meta.inner_steps": 5})]
