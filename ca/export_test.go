package ca

// LeafTemplate is leafTemplate, for the test that holds the fast path's
// encoding to x509.CreateCertificate's of the same template: a field
// added to the template and left out of signLeaf fails it.
var LeafTemplate = leafTemplate
