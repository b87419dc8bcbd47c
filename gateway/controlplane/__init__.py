"""The xDS control plane: Consul's catalog (or a static list) and the edge
policy rendered into Envoy listeners, clusters and endpoints, served over ADS."""
